"""When the edge tries a lost verifier session again: exponential backoff with full jitter.

Pure schedule, no clock: the client (edge_client.client) sleeps what `retry_delay_s` says between
reconnects, which resume the transcript. A verifier's retry-after hint is a floor on the wait.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from shared.errors import UserFacingError


class RetryPolicyError(UserFacingError, ValueError):
    """A retry setting out of its valid range."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a lost session is resumed.

    `max_retries` bounds the reconnects in a row that commit nothing (0: never retry); an attempt that commits
    tokens starts the count afresh, so a long generation survives any number of separate faults.
    """

    max_retries: int = 5
    initial_backoff_ms: float = 500.0
    max_backoff_ms: float = 10_000.0
    multiplier: float = 2.0
    jitter: bool = True  # full jitter: uniform in [0, backoff], so clients cut off together do not return together

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise RetryPolicyError(f"max_retries must be >= 0, got {self.max_retries}")
        if not 0 <= self.initial_backoff_ms <= self.max_backoff_ms:
            raise RetryPolicyError(f"backoffs must satisfy 0 <= initial_backoff_ms <= max_backoff_ms, got "
                                   f"{self.initial_backoff_ms} and {self.max_backoff_ms}")
        if self.multiplier < 1:
            raise RetryPolicyError(f"multiplier must be >= 1, got {self.multiplier}")

    def backoff_ms(self, retry: int) -> float:
        """The ceiling of the wait before retry number `retry` (0 for the first): exponential, capped."""
        if retry < 0:
            raise RetryPolicyError(f"retry must be >= 0, got {retry}")
        try:
            return min(self.max_backoff_ms, self.initial_backoff_ms * self.multiplier**retry)
        except OverflowError:  # the power outgrew a float, and so the cap, long ago
            return self.max_backoff_ms if self.initial_backoff_ms > 0 else 0.0


def retry_delay_s(policy: RetryPolicy, retry: int, rng: random.Random, retry_after_ms: float | None = None) -> float:
    """Seconds to wait before retry number `retry` (0 for the first); never sooner than the server's hint.

    Full jitter ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015): uniform in [0, backoff].
    """
    backoff_ms = policy.backoff_ms(retry)
    delay_ms = rng.uniform(0.0, backoff_ms) if policy.jitter else backoff_ms
    if retry_after_ms is not None:
        delay_ms = max(delay_ms, retry_after_ms)
    return delay_ms / 1e3
