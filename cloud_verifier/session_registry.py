"""The verifier's live sessions: ids, the capacity limit, and counts for GetStats.

A session is held for exactly as long as its RPC runs: `hold` frees it on finish, error,
cancellation or disconnect alike. Used from the server's event loop only.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cloud_verifier.errors import CapacityError
from cloud_verifier.session import VerifierSession


@dataclass(frozen=True)
class SessionCounts:
    live: int
    opened: int
    closed: int
    cache_bytes: int  # target KV cache held by the live sessions


class SessionRegistry:
    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.max_sessions = max_sessions
        self._sessions: dict[str, VerifierSession] = {}
        self._opened = 0
        self._closed = 0

    @contextmanager
    def hold(self, session: VerifierSession) -> Iterator[str]:
        """Register `session` under a fresh id for the duration of the block."""
        if len(self._sessions) >= self.max_sessions:
            raise CapacityError(f"the verifier already serves its maximum of {self.max_sessions} sessions; retry later")
        session_id = uuid.uuid4().hex
        self._sessions[session_id] = session
        self._opened += 1
        try:
            yield session_id
        finally:
            del self._sessions[session_id]
            self._closed += 1

    @property
    def counts(self) -> SessionCounts:
        return SessionCounts(live=len(self._sessions), opened=self._opened, closed=self._closed,
                             cache_bytes=sum(session.cache.nbytes for session in self._sessions.values()))
