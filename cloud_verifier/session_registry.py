"""The verifier's live sessions: ids, the capacity limit, and the KV cache they hold.

A session is held for exactly as long as its RPC runs: `hold` frees it on finish, error,
cancellation or disconnect alike; the metrics count each opening and closing. Used from the
server's event loop only, except `counts`, which the metrics endpoint's thread reads too.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cloud_verifier.errors import CapacityError, VerifierUnavailableError
from cloud_verifier.kv_pool import KvPool
from cloud_verifier.logs import SESSION_ID
from cloud_verifier.metrics import VerifierMetrics
from cloud_verifier.session import VerifierSession


@dataclass(frozen=True)
class SessionCounts:
    live: int
    # Target KV buffers allocated by the live sessions: each allocates its whole reservation at its first
    # forward (KvPool.reserved_bytes counts reservations from admission on).
    cache_bytes: int


class SessionRegistry:
    def __init__(self, max_sessions: int, max_sessions_per_client: int | None = None,
                 metrics: VerifierMetrics | None = None, kv_pool: KvPool | None = None) -> None:
        """`kv_pool`: admits sessions by their KV reservation and keeps their caches when they end (None: no budget)."""
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client or max_sessions
        self._sessions: dict[str, VerifierSession] = {}
        self._live_by_client: Counter[str] = Counter()
        self.metrics = metrics or VerifierMetrics()
        self.kv_pool = kv_pool
        self._draining = False

    def start_draining(self) -> None:
        """From now on new sessions are refused (UNAVAILABLE): the verifier is shutting down."""
        self._draining = True

    @contextmanager
    def hold(self, session: VerifierSession, client: str = "") -> Iterator[str]:
        """Register `session` of `client` under a fresh id for the duration of the block."""
        if self._draining:
            raise VerifierUnavailableError("the verifier is shutting down; retry on another replica")
        if len(self._sessions) >= self.max_sessions:
            raise CapacityError(f"the verifier already serves its maximum of {self.max_sessions} sessions; retry later")
        if self._live_by_client[client] >= self.max_sessions_per_client:
            raise CapacityError(f"this client already holds its maximum of {self.max_sessions_per_client} live sessions; "
                                f"end one or retry later")
        reserved_bytes = self.kv_pool.reserve(session.reserved_tokens) if self.kv_pool is not None else 0
        session_id = uuid.uuid4().hex
        self._sessions[session_id] = session
        self._live_by_client[client] += 1
        self.metrics.session_opened()
        # Every line the call logs from here on names its session, the interceptor's refusal after it too (each
        # call runs in a context of its own).
        SESSION_ID.set(session_id)
        try:
            yield session_id
        finally:
            del self._sessions[session_id]
            if self.kv_pool is not None:
                self.kv_pool.release(reserved_bytes)
                if session.finished:  # no round of it can still be in a forward: its cache is settled
                    self.kv_pool.keep(session.committed_ids, session.cache)
            self._live_by_client[client] -= 1
            if not self._live_by_client[client]:
                del self._live_by_client[client]
            self.metrics.session_closed()

    @property
    def counts(self) -> SessionCounts:
        sessions = list(self._sessions.values())  # one copy, which the event loop cannot change mid-sum
        return SessionCounts(live=len(sessions), cache_bytes=sum(session.cache.nbytes for session in sessions))
