"""The one draft -> verify -> commit loop, whatever carries the verdicts.

The gRPC client (edge_client.client), the in-process loop (specbridge.speculative), the
benchmarks and the tests all run `run_speculation`; only the `verify` coroutine differs. While
a verification is in flight the drafter drafts ahead, and each round's draft length comes from
the network-aware controller (edge_client.draft_length) unless it is fixed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edge_client.draft_length import DraftLengthPolicy, DraftLengthState, RoundObservation, choose_draft_len, observe
from edge_client.drafter import Drafter
from shared.decoding import DecodingConfig
from shared.proposal import DraftProposal
from shared.wire import ServedRound

Result = TypeVar("Result")
RoundVerifier = Callable[[DraftProposal], Awaitable[ServedRound]]
RoundSink = Callable[["RoundRecord"], None]


@dataclass(frozen=True)
class SpeculationSettings:
    draft_len: int | None = None  # None: chosen each round by the controller; a number fixes it
    # The controller's bounds and priors; its `draft_ahead` switches drafting during verification.
    policy: DraftLengthPolicy = field(default_factory=lambda: DraftLengthPolicy(draft_ahead=True))

    def __post_init__(self) -> None:
        if self.draft_len is not None and self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1 or None (adaptive), got {self.draft_len}")


@dataclass(frozen=True)
class RoundRecord:
    """One round as the edge saw it."""

    draft_len: int  # draft tokens proposed
    draft_tokens_accepted: int  # of those, covered by the committed bytes
    proposed_count: int  # target tokens the proposal became
    accepted_count: int  # of those, accepted as proposed
    committed_count: int  # target tokens committed (accepted + correction or bonus)
    draft_ms: float  # drafting after the previous verdict, on the critical path
    round_trip_ms: float  # proposal handed to `verify` -> verdict back
    verify_ms: float  # the verifier's own share of the round trip
    ahead_drafted: int  # tokens lying drafted ahead when the verdict arrived
    ahead_survived: int  # drafted tokens that continue the committed text into the next proposal


class RoundsView:
    """Per-round figures of a result that holds its `speculation_rounds` (the client's and the in-process loop's)."""

    speculation_rounds: tuple[RoundRecord, ...]

    @property
    def accepted_per_round(self) -> tuple[int, ...]:
        """Proposed target tokens the target accepted, each round."""
        return tuple(record.accepted_count for record in self.speculation_rounds)

    @property
    def proposed_per_round(self) -> tuple[int, ...]:
        """Target tokens the draft became, each round."""
        return tuple(record.proposed_count for record in self.speculation_rounds)

    @property
    def draft_tokens_per_round(self) -> tuple[int, ...]:
        return tuple(record.draft_len for record in self.speculation_rounds)

    @property
    def draft_ms_per_round(self) -> tuple[float, ...]:
        return tuple(record.draft_ms for record in self.speculation_rounds)

    @property
    def round_trip_ms(self) -> tuple[float, ...]:
        return tuple(record.round_trip_ms for record in self.speculation_rounds)


async def owned_until_done(task: asyncio.Future[Result]) -> Result:
    """`task`'s result. A cancelled caller still waits for it to end before the cancellation goes on: a thread
    drafting owns the drafter (its KV cache, its tokenizer) until it returns, and a drafter given back earlier
    could be handed to another generation while still in use."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


async def on_drafter_thread(work: Callable[..., Result], *args: Any) -> Result:
    """`work(*args)` on a thread, which owns the drafter until it returns (see owned_until_done)."""
    return await owned_until_done(asyncio.ensure_future(asyncio.to_thread(work, *args)))


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


async def run_speculation(drafter: Drafter, verify: RoundVerifier, config: DecodingConfig,
                          settings: SpeculationSettings, on_round: RoundSink | None = None) -> tuple[ServedRound, tuple[RoundRecord, ...]]:
    """Rounds until the verifier says finished; `drafter` must be started on the session's text.

    Returns the last verdict and every round's record; `on_round` sees each record as its round ends (a caller
    that resumes after a lost connection keeps the rounds of the attempts that failed).
    """
    policy = settings.policy
    state = DraftLengthState()
    draft_len = settings.draft_len or choose_draft_len(state, policy)
    records: list[RoundRecord] = []
    while True:
        ready_before = drafter.ahead_count
        drafting = time.perf_counter()
        proposal = await on_drafter_thread(drafter.propose, draft_len, config)
        draft_ms = _ms_since(drafting)
        fresh = len(proposal.tokens) - min(ready_before, len(proposal.tokens))
        draft_step_ms = draft_ms / fresh if fresh else 0.0
        sent = time.perf_counter()
        stop_ahead = threading.Event()
        ahead = None
        if policy.draft_ahead and not proposal.ends_with_eos:
            # No further than the next proposal will reach: more would only be rolled back, and on a device
            # whose memory bus the verifier shares (a benchmark's), each step also slows the verification.
            ahead = asyncio.ensure_future(asyncio.to_thread(drafter.draft_ahead, draft_len, config, stop_ahead))
        try:
            served = await verify(proposal)
        finally:
            # The drafting thread owns the drafter until it returns, whatever became of the verdict.
            stop_ahead.set()
            ahead_drafted = await owned_until_done(ahead) if ahead is not None else 0
        round_trip_ms = _ms_since(sent)
        outcome = served.outcome
        survived = 0 if outcome.finished else await on_drafter_thread(drafter.commit, outcome.committed_bytes)
        record = RoundRecord(draft_len=len(proposal.tokens), draft_tokens_accepted=outcome.draft_tokens_accepted,
                             proposed_count=outcome.proposed_count, accepted_count=len(outcome.accepted_ids),
                             committed_count=len(outcome.new_ids), draft_ms=draft_ms, round_trip_ms=round_trip_ms,
                             verify_ms=served.verify_ms, ahead_drafted=ahead_drafted, ahead_survived=survived)
        records.append(record)
        if on_round is not None:
            on_round(record)
        if outcome.finished:
            return served, tuple(records)
        if settings.draft_len is None:
            state = observe(state, _observation(record, draft_step_ms), policy)
            draft_len = choose_draft_len(state, policy)


def _observation(record: RoundRecord, draft_step_ms: float) -> RoundObservation:
    return RoundObservation(draft_len=record.draft_len, draft_tokens_accepted=record.draft_tokens_accepted,
                            committed_tokens=record.committed_count, draft_ms=record.draft_ms,
                            draft_step_ms=draft_step_ms, round_trip_ms=record.round_trip_ms,
                            verify_ms=record.verify_ms, ahead_survived=record.ahead_survived)
