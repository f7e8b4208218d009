"""Continuous batching: every planned round waiting at a step shares ONE target forward.

The batch stage of the verifier, between `VerifierSession.plan` and `.decide`. A single worker
thread takes whatever is queued, runs the forward, decides each row and resolves its awaiting
coroutine on that coroutine's event loop; sessions join and leave between steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from cloud_verifier.errors import VerifierUnavailableError
from cloud_verifier.metrics import VerifierMetrics
from cloud_verifier.session import PlannedRound, VerifierSession, decide_together
from cloud_verifier.target import TargetModel
from shared.proposal import RoundOutcome

log = logging.getLogger(__name__)

# A feed this much longer than the shortest in its forward (and past MIN_SPLIT_FEED tokens)
# goes to a forward of its own rather than padding every row to it: prefills, mostly.
SPLIT_FEED_RATIO = 4
MIN_SPLIT_FEED = 16


class BatchForwardError(RuntimeError):
    """The target forward failed for the rounds of one batch."""


class SchedulerClosedError(VerifierUnavailableError):
    """The scheduler stopped (shutdown, or its worker died) before this round ran."""


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
    """Row indices grouped into forwards so that no row is padded to a feed far longer than its own.

    Feeds are the only padding: each row attends over its own cache (kv_cache.py), so rows of any
    context lengths share a forward at no cost to one another.
    """
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

    def __init__(self, target: TargetModel, max_batch: int, metrics: VerifierMetrics | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.target = target
        self.max_batch = max_batch
        self._queue: deque[_Pending] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.metrics = metrics or VerifierMetrics()
        self._worker = threading.Thread(target=self._run, name="specbridge-batcher", daemon=True)
        self._worker.start()

    @property
    def queued_rounds(self) -> int:
        return len(self._queue)  # one read of a deque: safe from any thread

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
            else:
                return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        for pending in left:
            pending.settle(None, SchedulerClosedError("the verifier is shutting down"))
        return None

    @property
    def alive(self) -> bool:
        """Whether rounds submitted now will run: the worker is up and no close has begun."""
        with self._wake:
            return self._worker.is_alive() and not self._closed

    def _run(self) -> None:
        step: list[_Pending] = []
        try:
            while (step := self._take_step()) is not None:
                # A cancelled caller's session is being dropped: spend no forward on it.
                live = [pending for pending in step if not pending.future.cancelled()]
                for group in split_by_feed_length([len(p.planned.feed_ids) for p in live]):
                    self._forward([live[row] for row in group])
        except BaseException as error:  # a bug in the worker itself: nothing may wait on it forever
            log.critical("the batch worker stopped; the verifier reports NOT_SERVING", exc_info=error)
            self._fail_all(step or [], SchedulerClosedError(f"the verifier's batch worker stopped: {_one_line(error)}"))

    def _fail_all(self, in_flight: list[_Pending], error: SchedulerClosedError) -> None:
        """Refuse every round from now on, and fail the ones in flight and queued (settled ones stay so)."""
        with self._wake:
            self._closed = True
            left, self._queue = list(self._queue), deque()
        for pending in in_flight + left:
            pending.settle(None, error)

    def _forward(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            feeds = self.target.forward([(p.session.cache, p.planned.feed_ids) for p in batch])
            outcomes = decide_together([(p.session, p.planned, feed) for p, feed in zip(batch, feeds)])
        except Exception as error:  # noqa: BLE001 - reported to exactly the guilty rows' callers
            if len(batch) > 1:
                # One row can fail a whole forward (an id the embedding lacks, memory for its long feed):
                # a failed forward leaves every cache as it was, so each row runs again alone and only
                # the guilty one fails.
                for pending in batch:
                    self._forward([pending])
                return
            batch[0].settle(None, BatchForwardError(f"target forward failed: {_one_line(error)}"))
            return
        busy_s = time.perf_counter() - started
        committed = 0
        for pending, outcome in zip(batch, outcomes):
            if isinstance(outcome, Exception):
                pending.settle(None, outcome)
                continue
            committed += len(outcome.new_ids)
            pending.settle(outcome, None)
        self.metrics.observe_forward(rows=len(batch), tokens_fed=sum(len(p.planned.feed_ids) for p in batch),
                                     seconds=busy_s, committed=committed)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
