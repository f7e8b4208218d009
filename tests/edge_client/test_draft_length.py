"""The adaptive draft-length controller: estimates, the cost model and the choice of k."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_client.draft_length import (
    DraftLengthPolicy,
    DraftLengthState,
    RoundModel,
    RoundObservation,
    choose_draft_len,
    expected_round,
    observe,
    round_model,
)

DRAFT_STEP_MS = 20.0
VERIFY_BASE_MS = 60.0
VERIFY_MS_PER_TOKEN = 10.0


def feed(observations: Iterable[RoundObservation], policy: DraftLengthPolicy,
         state: DraftLengthState = DraftLengthState()) -> DraftLengthState:
    for observation in observations:
        state = observe(state, observation, policy)
    return state


def simulated_round(draft_len: int, accepted: int, network_ms: float, *, draft_step_ms: float = DRAFT_STEP_MS,
                    ahead_carried: int = 0, ahead_survived: int = 0,
                    target_tokens_per_draft_token: int = 1) -> RoundObservation:
    verify_ms = VERIFY_BASE_MS + VERIFY_MS_PER_TOKEN * draft_len
    return RoundObservation(draft_len=draft_len, draft_tokens_accepted=accepted,
                            committed_tokens=target_tokens_per_draft_token * accepted + 1,
                            draft_ms=max(draft_len - ahead_carried, 0) * draft_step_ms, draft_step_ms=draft_step_ms,
                            round_trip_ms=network_ms + verify_ms, verify_ms=verify_ms, ahead_survived=ahead_survived)


def accepted_prefix(draft_len: int, acceptance_rate: float, rng: random.Random) -> int:
    accepted = 0
    while accepted < draft_len and rng.random() < acceptance_rate:
        accepted += 1
    return accepted


def cycled_rounds(network_ms: float, acceptance_rate: float, *, draft_step_ms: float = DRAFT_STEP_MS,
                  survival_rate: float = 0.0, rounds: int = 240, seed: int = 0) -> list[RoundObservation]:
    """Rounds with k cycling over 1..12, so every position and the verify slope are seen.

    Acceptance and survival draw from separate generators: the same seed gives the same acceptances
    whatever the survival rate."""
    acceptance_rng, survival_rng = random.Random(seed), random.Random(seed + 1)
    observations, ahead_carried = [], 0
    for index in range(rounds):
        draft_len = 1 + index % 12
        accepted = accepted_prefix(draft_len, acceptance_rate, acceptance_rng)
        in_flight_ms = network_ms + VERIFY_BASE_MS + VERIFY_MS_PER_TOKEN * draft_len
        survived = accepted == draft_len and survival_rng.random() < survival_rate
        ahead_survived = min(int(in_flight_ms // draft_step_ms), 12) if survived else 0
        observations.append(simulated_round(draft_len, accepted, network_ms, draft_step_ms=draft_step_ms,
                                            ahead_carried=ahead_carried, ahead_survived=ahead_survived))
        ahead_carried = ahead_survived
    return observations


def test_cold_start_proposes_initial_len_and_a_finite_model() -> None:
    policy = DraftLengthPolicy(initial_len=5)
    assert choose_draft_len(DraftLengthState(), policy) == 5
    for draft_len in range(policy.max_len + 1):
        tokens, round_ms = expected_round(DraftLengthState(), policy, draft_len)
        assert tokens >= 1 and 0 < round_ms < math.inf


observations = st.integers(0, 16).flatmap(lambda draft_len: st.builds(
    RoundObservation,
    draft_len=st.just(draft_len),
    draft_tokens_accepted=st.integers(0, draft_len),
    committed_tokens=st.integers(0, 20),
    draft_ms=st.floats(0, 1e4),
    draft_step_ms=st.floats(0, 1e3),
    round_trip_ms=st.floats(0, 1e4),
    verify_ms=st.floats(0, 1e4),
    ahead_survived=st.integers(0, 16),
))
policies = st.integers(1, 16).flatmap(lambda max_len: st.integers(0, max_len).flatmap(lambda min_len: st.builds(
    DraftLengthPolicy,
    min_len=st.just(min_len),
    max_len=st.just(max_len),
    initial_len=st.integers(min_len, max_len),
    decay_per_round=st.floats(0.05, 1.0),
    draft_ahead=st.booleans(),
)))


@given(policies, st.lists(observations, max_size=30))
def test_choice_stays_in_bounds_and_the_model_finite(policy: DraftLengthPolicy,
                                                     history: list[RoundObservation]) -> None:
    state = DraftLengthState()
    for observation in history:
        state = observe(state, observation, policy)
        assert policy.min_len <= choose_draft_len(state, policy) <= policy.max_len
    model = round_model(state, policy)
    assert all(0 <= alpha <= 1 for alpha in model.acceptance_by_position)
    assert 0 <= model.ahead_survival_rate <= 1
    for draft_len in range(policy.max_len + 1):
        tokens, round_ms = model.expected_round(draft_len)
        assert 1 <= tokens < math.inf and 0 < round_ms < math.inf


def run_controller(policy: DraftLengthPolicy, all_accepted: bool, rounds: int = 60) -> list[int]:
    """Closed loop: the chosen k is proposed, then all or none of it accepted."""
    state, chosen = DraftLengthState(), []
    for _ in range(rounds):
        draft_len = choose_draft_len(state, policy)
        chosen.append(draft_len)
        accepted = draft_len if all_accepted else 0
        state = observe(state, simulated_round(draft_len, accepted, network_ms=50.0), policy)
    return chosen


def test_full_acceptance_grows_the_draft_to_max_len() -> None:
    chosen = run_controller(DraftLengthPolicy(), all_accepted=True)
    assert chosen == sorted(chosen)
    assert chosen[-1] == 12


def test_zero_acceptance_shrinks_the_draft_to_min_len() -> None:
    assert run_controller(DraftLengthPolicy(), all_accepted=False)[-1] == 1
    # With min_len 0 a useless draft is not proposed at all: verify-only rounds cost the least.
    assert run_controller(DraftLengthPolicy(min_len=0), all_accepted=False)[-1] == 0


def test_longer_round_trips_choose_longer_drafts() -> None:
    policy = DraftLengthPolicy()
    chosen = {network_ms: choose_draft_len(feed(cycled_rounds(network_ms, 0.7), policy), policy)
              for network_ms in (1.0, 15.0, 60.0, 150.0)}
    assert list(chosen.values()) == sorted(chosen.values())
    assert chosen[150.0] > chosen[1.0]


def best_rate(model: RoundModel) -> float:
    return max(tokens / round_ms for tokens, round_ms in map(model.expected_round, range(1, 13)))


@given(st.floats(0.0, 1.0), st.floats(0, 500), st.floats(0.5, 100), st.floats(0.0, 1.0), st.integers(0, 12))
def test_draft_ahead_never_makes_a_round_slower(acceptance_rate: float, network_ms: float, draft_step_ms: float,
                                                survival_rate: float, draft_len: int) -> None:
    plain = RoundModel((acceptance_rate,) * 12, 1.0, draft_step_ms, 0.0, network_ms, VERIFY_BASE_MS,
                       VERIFY_MS_PER_TOKEN, ahead_survival_rate=0.0)
    ahead = replace(plain, ahead_survival_rate=survival_rate)
    plain_tokens, plain_ms = plain.expected_round(draft_len)
    ahead_tokens, ahead_ms = ahead.expected_round(draft_len)
    assert ahead_tokens == plain_tokens and ahead_ms <= plain_ms
    assert best_rate(ahead) >= best_rate(plain)


def test_a_surviving_round_costs_the_longer_of_round_trip_and_drafting() -> None:
    always_survives = RoundModel((1.0,) * 12, 1.0, 50.0, 0.0, 150.0, VERIFY_BASE_MS, VERIFY_MS_PER_TOKEN, 1.0)
    for draft_len in range(13):
        in_flight_ms = 150.0 + VERIFY_BASE_MS + VERIFY_MS_PER_TOKEN * draft_len
        assert always_survives.expected_round(draft_len) == (draft_len + 1, max(in_flight_ms, draft_len * 50.0))


def test_draft_ahead_with_a_slow_drafter_proposes_what_the_round_trip_hides() -> None:
    # Not "never shorter": with 50 ms steps, 12 tokens take 600 ms against a ~300 ms round trip, so a
    # surviving round is drafting-bound; six tokens keep drafting and verification overlapped and earn
    # the bonus token twice as often. Without draft-ahead the 210 ms fixed cost favours max_len.
    model = RoundModel((1.0,) * 12, 1.0, 50.0, 0.0, 150.0, VERIFY_BASE_MS, VERIFY_MS_PER_TOKEN, 0.0)
    ahead_model = replace(model, ahead_survival_rate=1.0)

    def best_len(candidate: RoundModel) -> int:
        return max(range(1, 13), key=lambda k: candidate.expected_round(k)[0] / candidate.expected_round(k)[1])

    assert best_len(model) == 12
    assert best_len(ahead_model) == 6
    assert best_rate(ahead_model) > best_rate(model)


def test_estimates_converge_to_the_simulated_rates() -> None:
    policy = DraftLengthPolicy(decay_per_round=1.0)
    rng = random.Random(1)
    rounds = [simulated_round(6, accepted_prefix(6, 0.8, rng), 40.0, target_tokens_per_draft_token=2)
              for _ in range(3000)]
    model = round_model(feed(rounds, policy), policy)
    assert model.acceptance_by_position[:4] == pytest.approx((0.8,) * 4, abs=0.04)
    # Never proposed: the pooled rate of the positions after the first that were.
    assert model.acceptance_by_position[6:] == pytest.approx((0.8,) * 6, abs=0.04)
    assert model.target_tokens_per_draft_token == pytest.approx(2.0, abs=0.01)
    assert model.network_ms == pytest.approx(40.0)
    assert model.draft_step_ms == pytest.approx(DRAFT_STEP_MS) and model.draft_overhead_ms == pytest.approx(0.0)

    ahead_policy = DraftLengthPolicy(decay_per_round=1.0, draft_ahead=True)
    ahead_state = feed(cycled_rounds(100.0, 0.9, survival_rate=0.6, rounds=3000), ahead_policy)
    ahead_model = round_model(ahead_state, ahead_policy)
    assert ahead_model.ahead_survival_rate == pytest.approx(0.6, abs=0.04)
    assert ahead_model.draft_overhead_ms == pytest.approx(0.0)  # surviving ahead tokens were not drafted again


def test_verify_slope_is_fitted_when_k_varies_and_assumed_when_it_does_not() -> None:
    policy = DraftLengthPolicy(decay_per_round=0.99)
    rng = random.Random(2)
    varied = [RoundObservation(draft_len=k, draft_tokens_accepted=0, committed_tokens=1, draft_ms=0.0,
                               draft_step_ms=0.0, round_trip_ms=200.0, verify_ms=40.0 + 7.0 * k + rng.gauss(0, 3))
              for k in (rng.randint(1, 12) for _ in range(500))]
    model = round_model(feed(varied, policy), policy)
    assert model.verify_ms_per_token == pytest.approx(7.0, abs=0.5)
    assert model.verify_base_ms == pytest.approx(40.0, abs=4.0)

    constant = [simulated_round(4, 2, 30.0)] * 50
    model = round_model(feed(constant, policy), policy)
    verify_ms = VERIFY_BASE_MS + 4 * VERIFY_MS_PER_TOKEN
    assert model.verify_ms_per_token == pytest.approx(policy.verify_slope_share * verify_ms / 4)
    assert model.verify_base_ms + 4 * model.verify_ms_per_token == pytest.approx(verify_ms)


def test_expected_round_matches_a_hand_computation() -> None:
    policy = DraftLengthPolicy(min_len=1, max_len=3, initial_len=2, decay_per_round=1.0, prior_weight=1.0,
                               prior_acceptance_rate=0.5, prior_deep_acceptance_rate=0.5, verify_slope_share=0.2)
    state = observe(DraftLengthState(), RoundObservation(draft_len=2, draft_tokens_accepted=1, committed_tokens=3,
                                                         draft_ms=20.0, draft_step_ms=10.0, round_trip_ms=100.0,
                                                         verify_ms=30.0), policy)
    # alpha_1 = (1 + 0.5) / 2 = 0.75; positions 2..: pooled (0 + 0.5) / (1 + 1) = 0.25, so alpha_2 =
    # (0 + 0.25) / 2 = 0.125 and alpha_3, never reached, = 0.25.
    # r = (2 extra tokens + 1 x 1.0) / (1 accepted + 1) = 1.5; network 70; verify slope 0.2 x 30 / 2 = 3, base 24.
    assert round_model(state, policy).acceptance_by_position == (0.75, 0.125, 0.25)
    assert expected_round(state, policy, 2) == pytest.approx((1 + 1.5 * (0.75 + 0.09375), 70 + 24 + 6 + 20))
    assert expected_round(state, policy, 3) == pytest.approx((1 + 1.5 * (0.75 + 0.09375 + 0.0234375),
                                                              70 + 24 + 9 + 30))
    # Draft-ahead: P(2 accepted) 0.09375 x prior survival 0.5 x min(20 drafting, 100 in flight) ms hidden.
    ahead = replace(policy, draft_ahead=True)
    assert expected_round(state, ahead, 2)[1] == pytest.approx(120 - 0.09375 * 0.5 * 20)


def test_degenerate_rounds_keep_the_model_finite() -> None:
    policy = DraftLengthPolicy()
    empty = RoundObservation(draft_len=0, draft_tokens_accepted=0, committed_tokens=1, draft_ms=0.0,
                             draft_step_ms=0.0, round_trip_ms=0.0, verify_ms=0.0)
    # The verifier's clock may report more than the edge measured around it: the network is then 0, not negative.
    skewed = RoundObservation(draft_len=3, draft_tokens_accepted=3, committed_tokens=4, draft_ms=0.0,
                              draft_step_ms=0.0, round_trip_ms=10.0, verify_ms=12.0)
    state = feed([empty, skewed], policy)
    model = round_model(state, policy)
    assert model.network_ms == 0.0 and model.draft_step_ms == policy.prior_draft_step_ms
    assert 1 <= choose_draft_len(state, policy) <= 12
    with pytest.raises(ValueError):
        RoundObservation(draft_len=2, draft_tokens_accepted=3, committed_tokens=4, draft_ms=0.0, draft_step_ms=0.0,
                         round_trip_ms=1.0, verify_ms=1.0)
    with pytest.raises(ValueError):
        RoundObservation(draft_len=2, draft_tokens_accepted=1, committed_tokens=2, draft_ms=math.nan,
                         draft_step_ms=0.0, round_trip_ms=1.0, verify_ms=1.0)
    with pytest.raises(ValueError):
        DraftLengthPolicy(min_len=5, initial_len=4)
    with pytest.raises(ValueError):
        expected_round(state, policy, 13)


def test_short_drafts_with_rejected_first_tokens_do_not_lock_the_length_short() -> None:
    # Bimodal acceptance: the first token fails 40% of the time, later ones rarely. After a stretch of
    # one-token drafts (all the controller could learn from), the unseen deeper positions keep their
    # prior, so under a long round trip the controller lengthens its drafts again.
    policy = DraftLengthPolicy()
    one_token_rounds = [simulated_round(1, accepted, 150.0) for accepted in (0, 1, 0, 1, 1) * 4]
    state = feed(one_token_rounds, policy)
    assert round_model(state, policy).acceptance_by_position[1] == pytest.approx(policy.prior_deep_acceptance_rate)
    assert choose_draft_len(state, policy) >= 4
