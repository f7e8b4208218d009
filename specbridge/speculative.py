"""The in-process speculative loop: ONNX draft proposes, the target verifies, repeat.

No network: the same records (DraftProposal, RoundOutcome) that later cross gRPC pass here by
call. Used by the tests, the benchmarks and as the reference the served path must match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cloud_verifier.session import VerifierSession
from cloud_verifier.target import TargetModel
from edge_client.drafter import Drafter
from shared.decoding import DecodingConfig
from shared.vocab import Vocab


@dataclass(frozen=True)
class GenerationResult:
    prompt_ids: tuple[int, ...]
    target_token_ids: tuple[int, ...]  # the new target ids, in order (EOS included if generated)
    output_bytes: bytes
    rounds: int
    proposed_per_round: tuple[int, ...]  # proxy target tokens proposed each round
    accepted_per_round: tuple[int, ...]  # of those, how many the target accepted
    draft_tokens_per_round: tuple[int, ...]
    target_forwards: int
    plan_us_per_round: float  # re-tokenize + align + proposal law, CPU microseconds (median)
    align_us_per_round: float  # align + proposal law alone (median)
    wall_s: float

    @property
    def text(self) -> str:
        return self.output_bytes.decode("utf-8", errors="replace")

    @property
    def mean_accepted_length(self) -> float:
        """Target tokens committed per round (accepted + the correction or bonus)."""
        return len(self.target_token_ids) / self.rounds if self.rounds else 0.0

    @property
    def forwards_per_token(self) -> float:
        return self.target_forwards / len(self.target_token_ids) if self.target_token_ids else 0.0


def speculative_generate(drafter: Drafter, target: TargetModel, target_vocab: Vocab, prompt: str, *,
                         max_new_tokens: int, draft_len: int, config: DecodingConfig,
                         draft_seed: int | None = None) -> GenerationResult:
    """Generate until EOS or `max_new_tokens` target tokens; the prompt is tokenized as `tokenizer(prompt)`."""
    started = time.perf_counter()
    prompt_ids = list(target_vocab.tokenizer(prompt)["input_ids"])
    session = VerifierSession(target_vocab, prompt_ids, config, max_new_tokens, max_draft_tokens=max(draft_len, 1))
    rng = np.random.default_rng(draft_seed if draft_seed is not None else config.seed)
    drafter.start(prompt)
    proposed, accepted, drafted, plan_us, align_us = [], [], [], [], []
    while not session.finished:
        proposal = drafter.propose(draft_len, config, rng)
        plan_started = time.perf_counter()
        planned = session.plan(proposal)
        plan_us.append((time.perf_counter() - plan_started) * 1e6)
        align_us.append(planned.align_us)
        logits = target.forward([(session.cache, planned.feed_ids)])[0]
        outcome = session.decide(planned, logits)
        proposed.append(outcome.proposed_count)
        accepted.append(len(outcome.accepted_ids))
        drafted.append(len(proposal.tokens))
        if not outcome.finished:
            drafter.commit(outcome.committed_bytes)
    return GenerationResult(
        prompt_ids=tuple(prompt_ids),
        target_token_ids=tuple(session.committed_ids[session.prompt_length :]),
        output_bytes=session.output_bytes,
        rounds=len(proposed),
        proposed_per_round=tuple(proposed),
        accepted_per_round=tuple(accepted),
        draft_tokens_per_round=tuple(drafted),
        target_forwards=len(proposed),
        plan_us_per_round=float(np.median(plan_us)) if plan_us else 0.0,
        align_us_per_round=float(np.median(align_us)) if align_us else 0.0,
        wall_s=time.perf_counter() - started,
    )
