"""The speculative loop in one process: the edge loop (edge_client.speculation) against a verifier
session called directly instead of over gRPC.

The same records (DraftProposal, ServedRound) that cross the wire pass here by call, and the same
loop (draft-ahead and the draft-length controller included) runs them. Used by the tests, the
benchmarks and as the reference the served path must match.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cloud_verifier.lazy_head import LazyLogits
from cloud_verifier.session import ProposalLimits, VerifierSession
from cloud_verifier.target import RowCache
from edge_client.draft_length import DraftLengthPolicy
from edge_client.drafter import Drafter
from edge_client.speculation import RoundRecord, RoundsView, SpeculationSettings, run_speculation
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal
from shared.vocab import Vocab
from shared.wire import ServedRound


@dataclass(frozen=True)
class GenerationResult(RoundsView):
    prompt_ids: tuple[int, ...]
    target_token_ids: tuple[int, ...]  # the new target ids, in order (EOS included if generated)
    output_bytes: bytes
    speculation_rounds: tuple[RoundRecord, ...]
    plan_us_per_round: float  # re-tokenize + align + proposal law, CPU microseconds (median)
    align_us_per_round: float  # align + proposal law alone (median)
    wall_s: float

    @property
    def text(self) -> str:
        return self.output_bytes.decode("utf-8", errors="replace")

    @property
    def rounds(self) -> int:
        return len(self.speculation_rounds)

    @property
    def target_forwards(self) -> int:
        return self.rounds  # one forward per round, in-process

    @property
    def mean_accepted_length(self) -> float:
        """Target tokens committed per round (accepted + the correction or bonus)."""
        return len(self.target_token_ids) / self.rounds if self.rounds else 0.0

    @property
    def forwards_per_token(self) -> float:
        return self.target_forwards / len(self.target_token_ids) if self.target_token_ids else 0.0


class TargetForward(Protocol):
    """What the loop needs of a target: TargetModel.forward (tests pass toy models with known laws)."""

    def forward(self, rows: Sequence[tuple[RowCache, Sequence[int]]]) -> list[LazyLogits]: ...


def speculative_generate(drafter: Drafter, target: TargetForward, target_vocab: Vocab, prompt: str, *,
                         max_new_tokens: int, draft_len: int | None, config: DecodingConfig,
                         draft_seed: int | None = None, draft_ahead: bool = True) -> GenerationResult:
    """Generate until EOS or `max_new_tokens` target tokens; the prompt is tokenized as `tokenizer(prompt)`.

    `draft_len` None lets the controller choose each round's length (edge_client.draft_length).
    """
    return asyncio.run(speculative_generate_async(drafter, target, target_vocab, prompt, max_new_tokens=max_new_tokens,
                                                  draft_len=draft_len, config=config, draft_seed=draft_seed,
                                                  draft_ahead=draft_ahead))


async def speculative_generate_async(drafter: Drafter, target: TargetForward, target_vocab: Vocab, prompt: str, *,
                                     max_new_tokens: int, draft_len: int | None, config: DecodingConfig,
                                     draft_seed: int | None = None, draft_ahead: bool = True) -> GenerationResult:
    """`speculative_generate` inside a running event loop: many generations can share one loop."""
    settings = SpeculationSettings(draft_len=draft_len, policy=DraftLengthPolicy(draft_ahead=draft_ahead))
    started = time.perf_counter()
    prompt_ids = list(target_vocab.tokenizer(prompt)["input_ids"])
    session = VerifierSession(target_vocab, prompt_ids, config, max_new_tokens,
                              ProposalLimits(max_draft_tokens=draft_len or settings.policy.max_len))
    plan_us: list[float] = []
    align_us: list[float] = []

    def verify_now(proposal: DraftProposal) -> ServedRound:
        verify_started = time.perf_counter()
        planned = session.plan(proposal)
        plan_us.append((time.perf_counter() - verify_started) * 1e6)
        align_us.append(planned.align_us)
        outcome = session.decide(planned, target.forward([(session.cache, planned.feed_ids)])[0])
        return session.served(outcome, verify_ms=(time.perf_counter() - verify_started) * 1e3)

    async def verify(proposal: DraftProposal) -> ServedRound:
        return await asyncio.to_thread(verify_now, proposal)

    drafter.start(prompt, draft_seed if draft_seed is not None else config.seed)
    _, records = await run_speculation(drafter, verify, config, settings)
    return GenerationResult(
        prompt_ids=tuple(prompt_ids),
        target_token_ids=tuple(session.committed_ids[session.prompt_length :]),
        output_bytes=session.output_bytes,
        speculation_rounds=records,
        plan_us_per_round=float(np.median(plan_us)) if plan_us else 0.0,
        align_us_per_round=float(np.median(align_us)) if align_us else 0.0,
        wall_s=time.perf_counter() - started,
    )
