"""The reconnect schedule: exponential backoff, capped, with full jitter, never sooner than the verifier's hint."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_client.retry import RetryPolicy, RetryPolicyError, retry_delay_s

policies = st.builds(RetryPolicy, max_retries=st.integers(0, 20), initial_backoff_ms=st.floats(0, 1e3),
                     max_backoff_ms=st.floats(1e3, 6e4), multiplier=st.floats(1, 4), jitter=st.booleans())
retries = st.integers(0, 5000)
hints = st.none() | st.floats(0, 1e5)


def test_backoff_doubles_from_the_initial_wait_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_ms=500.0, max_backoff_ms=3000.0, jitter=False)
    assert [retry_delay_s(policy, retry, random.Random(0)) for retry in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@given(policies, retries, st.integers(0, 2**32))
def test_full_jitter_lies_between_zero_and_the_backoff(policy: RetryPolicy, retry: int, seed: int) -> None:
    delay_ms = retry_delay_s(policy, retry, random.Random(seed)) * 1e3
    backoff_ms = policy.backoff_ms(retry)
    assert backoff_ms <= policy.max_backoff_ms
    if policy.jitter:
        assert 0 <= delay_ms <= backoff_ms * (1 + 1e-12)
    else:
        assert delay_ms == pytest.approx(backoff_ms)


@given(policies, retries)
def test_the_ceiling_never_shrinks_from_one_retry_to_the_next(policy: RetryPolicy, retry: int) -> None:
    assert policy.initial_backoff_ms <= policy.backoff_ms(0) <= policy.backoff_ms(retry) <= policy.backoff_ms(retry + 1)


@given(policies, retries, hints, st.integers(0, 2**32))
def test_the_servers_hint_is_a_floor_and_otherwise_changes_nothing(policy: RetryPolicy, retry: int, hint: float | None,
                                                                   seed: int) -> None:
    own_s = retry_delay_s(policy, retry, random.Random(seed))
    hinted_s = retry_delay_s(policy, retry, random.Random(seed), retry_after_ms=hint)
    assert hinted_s == (own_s if hint is None else max(own_s, hint / 1e3))


def test_jitter_spreads_clients_cut_off_together() -> None:
    policy = RetryPolicy()
    delays = {retry_delay_s(policy, 3, random.Random(seed)) for seed in range(20)}
    assert len(delays) == 20 and max(delays) <= policy.backoff_ms(3) / 1e3


@pytest.mark.parametrize("settings, message", [
    ({"max_retries": -1}, "max_retries must be >= 0"),
    ({"initial_backoff_ms": -1.0}, "backoffs must satisfy"),
    ({"initial_backoff_ms": 2000.0, "max_backoff_ms": 1000.0}, "backoffs must satisfy"),
    ({"multiplier": 0.5}, "multiplier must be >= 1"),
])
def test_settings_out_of_range_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(RetryPolicyError, match=message):
        RetryPolicy(**settings)
