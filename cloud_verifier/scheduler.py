"""Continuous batching: every planned round waiting at a step shares ONE target forward.

The batch stage of the verifier, between `VerifierSession.plan` and `.decide`. A single worker
thread takes whatever is queued, runs the forward, decides each row and resolves its awaiting
coroutine on that coroutine's event loop; sessions join and leave between steps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from cloud_verifier.session import PlannedRound, VerifierSession, decide_together
from cloud_verifier.target import TargetModel
from shared.proposal import RoundOutcome

# A feed this much longer than the shortest in its forward (and past MIN_SPLIT_FEED tokens)
# goes to a forward of its own rather than padding every row to it: prefills, mostly.
SPLIT_FEED_RATIO = 4
MIN_SPLIT_FEED = 16


class BatchForwardError(RuntimeError):
    """The target forward failed for the rounds of one batch."""


class SchedulerClosedError(RuntimeError):
    """The scheduler stopped before this round ran."""


@dataclass(frozen=True)
class BatchStats:
    forwards: int = 0
    rows: int = 0
    tokens_fed: int = 0
    committed_tokens: int = 0
    busy_ms: float = 0.0  # the worker's time in target forwards and acceptance decisions

    @property
    def rows_per_forward(self) -> float:
        return self.rows / self.forwards if self.forwards else 0.0


@dataclass(frozen=True)
class _Pending:
    session: VerifierSession
    planned: PlannedRound
    future: asyncio.Future[RoundOutcome]
    loop: asyncio.AbstractEventLoop

    def settle(self, outcome: RoundOutcome | None, error: BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, outcome, error)
        except RuntimeError:  # that event loop has closed: nobody awaits this round any more
            pass


def _settle(future: asyncio.Future[RoundOutcome], outcome: RoundOutcome | None, error: BaseException | None) -> None:
    if future.done():  # the caller went away (cancelled) while its row was in flight
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcome)


def split_by_feed_length(feed_lengths: Sequence[int]) -> list[list[int]]:
    """Row indices grouped into forwards so that no row is padded to a feed far longer than its own."""
    order = sorted(range(len(feed_lengths)), key=lambda row: feed_lengths[row])
    groups: list[list[int]] = []
    for row in order:
        length = feed_lengths[row]
        if groups and not (length > MIN_SPLIT_FEED and length > SPLIT_FEED_RATIO * feed_lengths[groups[-1][0]]):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


class BatchScheduler:
    """Owns the target model: only its worker thread runs forwards, so sessions never race on it."""

    def __init__(self, target: TargetModel, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.target = target
        self.max_batch = max_batch
        self._queue: deque[_Pending] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._stats = BatchStats()
        self._worker = threading.Thread(target=self._run, name="specbridge-batcher", daemon=True)
        self._worker.start()

    @property
    def stats(self) -> BatchStats:
        with self._wake:
            return self._stats

    async def submit(self, session: VerifierSession, planned: PlannedRound) -> RoundOutcome:
        """Queue one planned round; returns once the step that includes it has decided it."""
        loop = asyncio.get_running_loop()
        pending = _Pending(session, planned, loop.create_future(), loop)
        with self._wake:
            if self._closed:
                raise SchedulerClosedError("the verifier is shutting down")
            self._queue.append(pending)
            self._wake.notify()
        return await pending.future

    def close(self) -> None:
        """Stop the worker after the step in flight; rounds still queued fail with SchedulerClosedError."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join()

    def _take_step(self) -> list[_Pending] | None:
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait()
            if self._closed:
                left, self._queue = list(self._queue), deque()
                for pending in left:
                    pending.settle(None, SchedulerClosedError("the verifier is shutting down"))
                return None
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _run(self) -> None:
        while (step := self._take_step()) is not None:
            # A cancelled caller's session is being dropped: spend no forward on it.
            live = [pending for pending in step if not pending.future.cancelled()]
            for group in split_by_feed_length([len(p.planned.feed_ids) for p in live]):
                self._forward([live[row] for row in group])

    def _forward(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            feeds = self.target.forward([(p.session.cache, p.planned.feed_ids) for p in batch])
            outcomes = decide_together([(p.session, p.planned, feed) for p, feed in zip(batch, feeds)])
        except Exception as error:  # noqa: BLE001 - reported to exactly this batch's callers
            failure = BatchForwardError(f"target forward over {len(batch)} rows failed: {_one_line(error)}")
            for pending in batch:
                pending.settle(None, failure)
            return
        busy_ms = (time.perf_counter() - started) * 1e3
        committed = 0
        for pending, outcome in zip(batch, outcomes):
            if isinstance(outcome, Exception):
                pending.settle(None, outcome)
                continue
            committed += len(outcome.new_ids)
            pending.settle(outcome, None)
        with self._wake:
            stats = self._stats
            self._stats = BatchStats(forwards=stats.forwards + 1, rows=stats.rows + len(batch),
                                     tokens_fed=stats.tokens_fed + sum(len(p.planned.feed_ids) for p in batch),
                                     committed_tokens=stats.committed_tokens + committed,
                                     busy_ms=stats.busy_ms + busy_ms)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
