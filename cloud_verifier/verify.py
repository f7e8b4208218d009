"""Acceptance rules: from the target's distributions over a proposal, how many tokens stay and what follows.

The last step of a verifier round, after the target forward over committed ids + x_1..x_m
(m + 1 rows: row j is the target's next-token law after x_j). Which rule is exact, and why: ../shared/ALGORITHM.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from shared.decoding import DecodingConfig


@dataclass(frozen=True)
class Verdict:
    accepted: int  # leading proposal tokens kept
    next_token: int | None  # the correction at the first rejection, else the bonus; None after an accepted EOS


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


def verify_greedy(logits: torch.Tensor, proposal: Sequence[int], eos_ids: frozenset[int]) -> Verdict:
    """Keep x_j while it is the target's argmax; then emit the argmax (torch.argmax ties, as generate)."""
    _check_shapes(logits, proposal)
    best = torch.argmax(logits, dim=-1).tolist()
    for position, token in enumerate(proposal):
        if token != best[position]:
            return Verdict(accepted=position, next_token=best[position])
        if token in eos_ids:
            return Verdict(accepted=position + 1, next_token=None)
    return Verdict(accepted=len(proposal), next_token=best[len(proposal)])


def verify_point_mass(probs: torch.Tensor, proposal: Sequence[int], eos_ids: frozenset[int],
                      generator: torch.Generator) -> Verdict:
    """Exact for any proposal made without these random numbers: keep x_j with probability p_j(x_j).

    A rejected x_j is replaced by a draw from p_j without x_j: P(y) = (1 - p(x)) p(y) / (1 - p(x)) = p(y).
    That is rejection sampling against a point mass q_j = 1 at x_j: min(1, p/q) = p(x_j), and
    max(0, p - q) is p with x_j removed.
    """
    return verify_rejection(probs, proposal, [{token: 1.0} for token in proposal], eos_ids, generator)


def verify_rejection(probs: torch.Tensor, proposal: Sequence[int], proposal_probs: Sequence[Mapping[int, float]],
                     eos_ids: frozenset[int], generator: torch.Generator) -> Verdict:
    """Speculative rejection sampling: keep x_j with probability min(1, p_j(x_j) / q_j(x_j)).

    A rejected x_j is replaced by a draw from max(0, p_j - q_j) normalised (from p_j if that is all
    zero, which only a q_j summing past 1 allows). Exact only when q_j is the law x_j was drawn from.
    """
    _check_shapes(probs, proposal)
    if len(proposal_probs) != len(proposal):
        raise ValueError(f"{len(proposal_probs)} proposal laws for {len(proposal)} proposal tokens")
    uniforms = _uniforms(len(proposal), generator)
    for position, token in enumerate(proposal):
        law = proposal_probs[position]
        proposed = law.get(token, 0.0)
        if not proposed > 0.0:
            raise ValueError(f"proposal token {token} at position {position} has no mass in its own proposal law")
        # u < min(1, p/q) without a division: u < 1 always, so p >= q accepts.
        if not uniforms[position] * proposed < float(probs[position, token]):
            row = _row(probs, position, generator)
            residual = _residual(row, law)
            return Verdict(accepted=position, next_token=_sample(residual if residual.sum() > 0 else row, generator))
        if token in eos_ids:
            return Verdict(accepted=position + 1, next_token=None)
    return Verdict(accepted=len(proposal), next_token=_sample(_row(probs, len(proposal), generator), generator))


def _check_shapes(rows: torch.Tensor, proposal: Sequence[int]) -> None:
    if rows.ndim != 2 or rows.shape[0] != len(proposal) + 1:
        raise ValueError(f"a proposal of {len(proposal)} tokens needs [{len(proposal) + 1}, vocab] rows, got {tuple(rows.shape)}")
    out_of_range = [t for t in proposal if not 0 <= t < rows.shape[1]]
    if out_of_range:
        raise ValueError(f"proposal ids outside the vocabulary of {rows.shape[1]}: {out_of_range[:5]}")


def _row(probs: torch.Tensor, position: int, generator: torch.Generator) -> torch.Tensor:
    # Draws happen where the generator lives, so one seed replays a session whatever the target's
    # device; only the one row a draw needs moves.
    return probs[position].to(generator.device)


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
