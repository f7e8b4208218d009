"""Acceptance rules: from the target's distributions over a proposal, how many tokens stay and what follows.

The last step of a verifier round, after the target forward over committed ids + x_1..x_m
(m + 1 rows: row j is the target's next-token law after x_j). Which rule is exact, and why: ../shared/ALGORITHM.md.
Every rule reads the rows left to right and stops at the first rejection, so each runs as a generator
that asks for one row at a time: the caller computes only the rows asked for (lazy_head.py).
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from shared.decoding import DecodingConfig


@dataclass(frozen=True)
class Verdict:
    accepted: int  # leading proposal tokens kept
    next_token: int | None  # the correction at the first rejection, else the bonus; None after an accepted EOS


# A rule in progress: it yields the position j (0..m, increasing) whose row it needs next, is sent that
# row ([vocab]: logits for greedy, probabilities for the sampling rules) and returns its Verdict.
Rule = Generator[int, torch.Tensor, Verdict]


def apply_rule(rows: torch.Tensor, rule: Rule) -> Verdict:
    """Run `rule` over rows already at hand, [m + 1, vocab]."""
    if rows.ndim != 2:
        raise ValueError(f"rows must be [m + 1, vocab], got shape {tuple(rows.shape)}")
    position = next(rule)
    while True:
        if position >= rows.shape[0]:
            raise ValueError(f"the rule asks for row {position} of {rows.shape[0]}: a proposal of m tokens needs m + 1 rows")
        try:
            position = rule.send(rows[position])
        except StopIteration as done:
            return done.value


def target_probs(logits: torch.Tensor, config: DecodingConfig) -> torch.Tensor:
    """Next-token probabilities [rows, vocab], warped exactly as target-only sampling would warp them.

    Same warpers, same order and same float32 as `generate(do_sample=True)` in transformers 5.x
    (`_get_logits_processor`: temperature, then top-k, then top-p, each only when not neutral).
    A baseline must pass top_k=0 explicitly: generate() fills an unset top_k with 50.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    scores = logits.to(torch.float32)
    no_input_ids = torch.empty((scores.shape[0], 0), dtype=torch.long, device=scores.device)  # unused by these warpers
    if config.temperature != 1.0:
        scores = TemperatureLogitsWarper(float(config.temperature))(no_input_ids, scores)
    if config.top_k != 0:
        scores = TopKLogitsWarper(top_k=config.top_k)(no_input_ids, scores)
    if config.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=config.top_p)(no_input_ids, scores)
    return torch.softmax(scores, dim=-1)


def warped_rule(rule: Rule, config: DecodingConfig) -> Rule:
    """`rule` over probabilities, sent logits rows: each warped by `target_probs`.

    The warpers and the softmax act on each row alone, so row by row equals the whole block at once.
    """
    position = next(rule)
    while True:
        logits = yield position
        try:
            position = rule.send(target_probs(logits[None], config)[0])
        except StopIteration as done:
            return done.value


def greedy_rule(proposal: Sequence[int], eos_ids: frozenset[int]) -> Rule:
    """Keep x_j while it is the target's argmax; then emit the argmax (torch.argmax ties, as generate)."""
    for position, token in enumerate(proposal):
        row = yield position
        if position == 0:
            _check_ids(proposal, row)
        best = int(torch.argmax(row))
        if token != best:
            return Verdict(accepted=position, next_token=best)
        if token in eos_ids:
            return Verdict(accepted=position + 1, next_token=None)
    row = yield len(proposal)
    return Verdict(accepted=len(proposal), next_token=int(torch.argmax(row)))


def point_mass_rule(proposal: Sequence[int], eos_ids: frozenset[int], generator: torch.Generator) -> Rule:
    """Exact for any proposal made without these random numbers: keep x_j with probability p_j(x_j).

    A rejected x_j is replaced by a draw from p_j without x_j: P(y) = (1 - p(x)) p(y) / (1 - p(x)) = p(y).
    That is rejection sampling against a point mass q_j = 1 at x_j: min(1, p/q) = p(x_j), and
    max(0, p - q) is p with x_j removed.
    """
    return (yield from rejection_rule(proposal, [{token: 1.0} for token in proposal], eos_ids, generator))


def rejection_rule(proposal: Sequence[int], proposal_probs: Sequence[Mapping[int, float]], eos_ids: frozenset[int],
                   generator: torch.Generator) -> Rule:
    """Speculative rejection sampling: keep x_j with probability min(1, p_j(x_j) / q_j(x_j)).

    A rejected x_j is replaced by a draw from max(0, p_j - q_j) normalised (from p_j if that is all
    zero, which only a q_j summing past 1 allows). Exact only when q_j is the law x_j was drawn from.
    """
    if len(proposal_probs) != len(proposal):
        raise ValueError(f"{len(proposal_probs)} proposal laws for {len(proposal)} proposal tokens")
    uniforms = _uniforms(len(proposal), generator)
    for position, token in enumerate(proposal):
        row = yield position
        if position == 0:
            _check_ids(proposal, row)
        law = proposal_probs[position]
        proposed = law.get(token, 0.0)
        if not proposed > 0.0:
            raise ValueError(f"proposal token {token} at position {position} has no mass in its own proposal law")
        # u < min(1, p/q) without a division: u < 1 always, so p >= q accepts.
        if not uniforms[position] * proposed < float(row[token]):
            row = _on_generator_device(row, generator)
            residual = _residual(row, law)
            return Verdict(accepted=position, next_token=_sample(residual if residual.sum() > 0 else row, generator))
        if token in eos_ids:
            return Verdict(accepted=position + 1, next_token=None)
    row = yield len(proposal)
    return Verdict(accepted=len(proposal), next_token=_sample(_on_generator_device(row, generator), generator))


def _check_ids(proposal: Sequence[int], row: torch.Tensor) -> None:
    out_of_range = [t for t in proposal if not 0 <= t < row.shape[-1]]
    if out_of_range:
        raise ValueError(f"proposal ids outside the vocabulary of {row.shape[-1]}: {out_of_range[:5]}")


def _on_generator_device(row: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Draws happen where the generator lives, so one seed replays a session whatever the target's
    # device; only the one row a draw needs moves.
    return row.to(generator.device)


def _uniforms(count: int, generator: torch.Generator) -> list[float]:
    # float64: a float32 uniform would bias acceptance by up to 2**-24 per position.
    return torch.rand(count, generator=generator, dtype=torch.float64, device=generator.device).tolist()


def _residual(row: torch.Tensor, law: Mapping[int, float]) -> torch.Tensor:
    """max(0, p - q) for a sparse q, in p's dtype."""
    residual = row.clone()
    ids = torch.tensor(list(law), device=row.device)
    residual.index_add_(0, ids, torch.tensor(list(law.values()), dtype=row.dtype, device=row.device), alpha=-1.0)
    return residual.clamp_min_(0.0)


def _sample(weights: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(weights, 1, generator=generator))
