"""The lazy output head: only the rows rules read, once each, a batch's rows in shared calls, laziness where it pays."""

from __future__ import annotations

import pytest
import torch

from cloud_verifier import lazy_head
from cloud_verifier.lazy_head import LazyLogits, compute_rows, head_block, run_rules
from cloud_verifier.verify import Verdict, apply_rule, greedy_rule

VOCAB = 6
NO_EOS: frozenset[int] = frozenset()


class CountingHead:
    """A linear head that notes how many rows each call computes."""

    def __init__(self) -> None:
        self.weight = torch.randn(VOCAB, 3, generator=torch.Generator().manual_seed(0))
        self.calls: list[int] = []

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(hidden.shape[0])
        return hidden @ self.weight.T


def _hidden(positions: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(positions, 3, generator=torch.Generator().manual_seed(seed))


def _all_rows(logits: LazyLogits) -> torch.Tensor:
    """Every row, computed in one head call (as the head used to run)."""
    compute_rows([(logits, 0, len(logits))])
    return torch.stack([logits[position] for position in range(len(logits))])


def _greedy_proposal(logits: torch.Tensor, accepted: int) -> list[int]:
    """A proposal for rows `logits` whose first `accepted` tokens are the argmax and the rest are not."""
    best = torch.argmax(logits, dim=-1).tolist()
    return [token if position < accepted else (token + 1) % VOCAB for position, token in enumerate(best[:-1])]


@pytest.mark.parametrize("count", [1, 2, 5, 9])
@pytest.mark.parametrize("lazy", [False, True])
def test_head_blocks_partition_the_rows(count: int, lazy: bool) -> None:
    blocks = sorted({head_block(position, count, lazy) for position in range(count)})
    assert blocks[0][0] == 0 and blocks[-1][1] == count
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(blocks, blocks[1:]))
    assert all(start <= position < stop for position in range(count) for start, stop in [head_block(position, count, lazy)])
    assert len(blocks) == (2 if lazy and count > 1 else 1)  # lazily, a rejected x_1 costs one row


def test_rows_are_computed_once_and_shared_with_tails() -> None:
    head, hidden = CountingHead(), _hidden(7)
    whole = LazyLogits(hidden, head)
    verify = whole.tail(4)  # a feed of 3 uncached committed ids and 3 proxy ids
    assert len(verify) == 4
    compute_rows([(verify, 1, 3)])
    assert head.calls == [2] and torch.equal(verify[2], head.weight @ hidden[5])
    with pytest.raises(LookupError):
        verify[0]
    assert torch.equal(_all_rows(whole)[5], verify[2])
    assert head.calls == [2, 5]  # only the rows still missing
    compute_rows([(verify, 0, 4)])
    assert head.calls == [2, 5]
    with pytest.raises(ValueError):
        whole.tail(8)
    with pytest.raises(IndexError):
        verify[4]


def _batch() -> tuple[list[LazyLogits], list[torch.Tensor], list[list[int]], CountingHead]:
    """Four rounds of one forward: x_1 rejected, 4 of 4 accepted, 1 of 2 accepted, and an id outside the vocabulary."""
    head, shapes = CountingHead(), ((5, 1), (5, 2), (3, 3), (4, 4))
    feeds = [LazyLogits(_hidden(n, seed), head) for n, seed in shapes]
    full = [_all_rows(LazyLogits(_hidden(n, seed), CountingHead())) for n, seed in shapes]
    proposals = [_greedy_proposal(full[0], 0), _greedy_proposal(full[1], 4), _greedy_proposal(full[2], 1), [VOCAB + 1] * 3]
    return feeds, full, proposals, head


@pytest.mark.parametrize("lazy", [False, True])
def test_a_batch_shares_each_head_call(lazy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy_head, "LAZY_FROM_ROWS", 17 if lazy else 18)  # the batch has 17 rows
    feeds, full, proposals, head = _batch()
    verdicts = run_rules([greedy_rule(proposal, NO_EOS) for proposal in proposals], feeds)
    for verdict, rows, proposal in zip(verdicts[:3], full, proposals):
        assert verdict == apply_rule(rows, greedy_rule(proposal, NO_EOS))
    assert [verdict.accepted for verdict in verdicts[:3]] == [0, 4, 1]
    assert isinstance(verdicts[3], ValueError)  # an id outside the vocabulary fails its own round only
    # Lazily: every first row in one call, then the later rows of the two rounds that accepted x_1 in another.
    assert head.calls == ([4, 4 + 2] if lazy else [17])


def test_a_rule_asking_past_its_rows_fails_alone() -> None:
    head, hidden = CountingHead(), _hidden(1)
    best = int(torch.argmax(head.weight @ hidden[0]))
    verdicts = run_rules([greedy_rule([best, 0], NO_EOS), greedy_rule([], NO_EOS)], [LazyLogits(hidden, head)] * 2)
    assert isinstance(verdicts[0], ValueError)  # x_1 accepted, and then no row for x_2
    assert verdicts[1] == Verdict(accepted=0, next_token=best)


def test_rows_of_different_targets_are_not_mixed() -> None:
    with pytest.raises(ValueError):
        compute_rows([(LazyLogits(_hidden(2), CountingHead()), 0, 1), (LazyLogits(_hidden(2), CountingHead()), 0, 1)])
