"""The output head on demand: logits only for the rows the acceptance rules read, batched across sessions.

Between the target forward (which stops at the decoder's hidden states) and the rules (verify.py), which
read rows left to right and stop at the first rejection. The head of a large vocabulary costs about as much
as the decoder (Gemma-3: 640 x 262,144): rows no rule reads (a prefill's) are never computed, nor, in large
batches, the rows after a rejection.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from cloud_verifier.verify import Rule, Verdict

# A head call reads the whole weight matrix (670 MB for Gemma-3-270M): on a few dozen rows it costs about the
# same whatever their number, and a second call is a second pass over it, so rows after a rejection are worth
# a second call only once the head is compute-bound. Measured (`specbridge bench verify-cost`, fp32, one CPU
# thread): 54 ms for one row, 107-161 ms for 4-16, then 4.5-7.5 ms a row (681 ms for 128). With x_1 rejected
# in ~38% of rounds, first rows alone and then the rest saves 6-14% of a step of 16 sessions proposing 6-8
# tokens (112-144 rows), is even to -3% at 80 rows, worse below, and at best even for one session.
LAZY_FROM_ROWS = 96


def head_block(position: int, count: int, lazy: bool) -> tuple[int, int]:
    """The rows [start, stop) of `count` computed together when row `position` is first asked for."""
    if not lazy or count == 1:
        return 0, count
    return (0, 1) if position == 0 else (1, count)


class LazyLogits:
    """One batch row's next-token logits at its fed positions, each computed at most once, by `compute_rows`.

    `tail(count)` views the last positions (a round's verify rows) and shares the rows computed so far.
    """

    def __init__(self, hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """`hidden`: [positions, hidden_size] decoder output; `head`: [k, hidden_size] -> [k, vocab] logits."""
        self.head = head
        self._hidden = hidden
        self._rows: list[torch.Tensor | None] = [None] * hidden.shape[0]
        self._start = 0

    def __len__(self) -> int:
        return self._hidden.shape[0] - self._start

    def tail(self, count: int) -> LazyLogits:
        if not 0 < count <= len(self):
            raise ValueError(f"cannot take the last {count} of {len(self)} rows")
        view = copy.copy(self)
        view._start = self._hidden.shape[0] - count
        return view

    def __getitem__(self, position: int) -> torch.Tensor:
        """Row `position` [vocab]; it must have been computed."""
        if not 0 <= position < len(self):
            raise IndexError(f"row {position} of {len(self)}")
        row = self._rows[self._start + position]
        if row is None:
            raise LookupError(f"row {position} has not been computed")
        return row


def compute_rows(blocks: Sequence[tuple[LazyLogits, int, int]]) -> None:
    """Compute the missing rows among [start, stop) of each LazyLogits, in ONE head call for all of them."""
    missing = [(logits, [logits._start + p for p in range(start, stop) if logits._rows[logits._start + p] is None])
               for logits, start, stop in blocks]
    missing = [(logits, positions) for logits, positions in missing if positions]
    if not missing:
        return
    head = missing[0][0].head
    if any(logits.head != head for logits, _ in missing):
        raise ValueError("rows computed together must come from one target's forward")
    computed = iter(head(torch.cat([logits._hidden[positions] for logits, positions in missing])))
    for logits, positions in missing:
        for position in positions:
            row = next(computed)
            if logits._rows[position] is None:  # asked twice in one call: a row once there never changes
                logits._rows[position] = row


def run_rules(rules: Sequence[Rule], logits: Sequence[LazyLogits]) -> list[Verdict | Exception]:
    """Run each rule over its own rows, in lockstep: each step's missing row blocks share ONE head call.

    A rule that raises fails alone (the exception is its result); a head call that raises fails them all.
    """
    if len(rules) != len(logits):
        raise ValueError(f"{len(rules)} rules for {len(logits)} rows")
    results: list[Verdict | Exception | None] = [None] * len(rules)
    asking: dict[int, int] = {}

    def advance(index: int, row: torch.Tensor | None) -> None:
        try:
            position = rules[index].send(row)  # None starts the rule
        except StopIteration as done:
            results[index] = done.value
        except Exception as error:  # noqa: BLE001 - one session's bad round must not fail the others
            results[index] = error
        else:
            if position < len(logits[index]):
                asking[index] = position
            else:
                results[index] = ValueError(f"the rule asks for row {position} of {len(logits[index])}")

    lazy = sum(len(rows) for rows in logits) >= LAZY_FROM_ROWS
    for index in range(len(rules)):
        advance(index, None)
    while asking:
        compute_rows([(logits[index], *head_block(position, len(logits[index]), lazy))
                      for index, position in asking.items()])
        for index, position in list(asking.items()):
            del asking[index]
            advance(index, logits[index][position])
    return results
