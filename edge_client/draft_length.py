"""Adaptive draft length: how many draft tokens k the edge proposes each round, chosen to maximise
committed target tokens per second (not per round) from decayed estimates of past rounds. Pure math:
the client calls `observe` after each verdict and `choose_draft_len` before drafting.

Cost model of one round with k draft tokens (steady state, every estimate from `round_model`):
    tokens(k) = r * A(k) + 1,  A(k) = sum_{i<=k} prod_{j<=i} alpha_j  (expected accepted draft tokens;
                r target tokens per accepted draft token; + 1 for the correction or bonus token)
    ms(k)     = network + verify(k) + overhead + k * step                  (no draft-ahead)
With draft-ahead the next proposal is drafted while this one is in flight and survives when all k are
accepted and the bonus matches the draft; such a round costs max(network + verify(k), k * step) instead
of their sum, so ms(k) drops by P(all k accepted) * survival * min(k * step, network + verify(k)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_ROUND_MS = 1e-3  # floor on an expected round, so all-zero measured costs still give a finite rate


@dataclass(frozen=True)
class RoundObservation:
    """What the edge measured on one verified round."""

    draft_len: int  # draft tokens proposed (k)
    draft_tokens_accepted: int  # of those, the ones the committed bytes fully cover (0..k)
    committed_tokens: int  # target tokens committed: accepted + the correction or bonus
    draft_ms: float  # drafting after the previous verdict, i.e. on the critical path
    draft_step_ms: float  # one draft step as timed this round; 0 when no step was timed
    round_trip_ms: float  # draft sent -> verdict received
    verify_ms: float  # the verifier's own share of the round trip, as it reported
    ahead_survived: int = 0  # draft-ahead tokens that carry into the next proposal

    def __post_init__(self) -> None:
        if not 0 <= self.draft_tokens_accepted <= self.draft_len:
            raise ValueError(f"draft_tokens_accepted must be in [0, draft_len={self.draft_len}], "
                             f"got {self.draft_tokens_accepted}")
        if self.committed_tokens < 0 or self.ahead_survived < 0:
            raise ValueError(f"token counts must be >= 0, got committed_tokens={self.committed_tokens}, "
                             f"ahead_survived={self.ahead_survived}")
        for name in ("draft_ms", "draft_step_ms", "round_trip_ms", "verify_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")


@dataclass(frozen=True)
class DraftLengthPolicy:
    """Bounds, memory and cold-start priors of the controller."""

    min_len: int = 1  # 0 allows verify-only rounds (plain remote decoding)
    max_len: int = 12
    initial_len: int = 4  # used until the first round has been observed
    decay_per_round: float = 0.95  # share of the past each round keeps: about 1 / (1 - decay) rounds of memory
    prior_weight: float = 2.0  # pseudo-observations behind each rate prior below
    prior_acceptance_rate: float = 0.7  # alpha_1 before data
    # alpha_i, i >= 2, before data: once a draft has matched its first token it tends to go on matching
    # (acceptance is bimodal: measured on the real pair, ~38% of drafts cover nothing, the rest ~2.5 tokens)
    prior_deep_acceptance_rate: float = 0.85
    prior_target_tokens_per_draft_token: float = 1.0
    prior_ahead_survival_rate: float = 0.5
    prior_draft_step_ms: float = 10.0  # cost priors hold only until the first measurement
    prior_network_ms: float = 20.0
    prior_verify_ms: float = 50.0
    # Until k has varied, the slope of verify(k) is not identifiable from the data: assume this share of
    # the mean verify time grows with k; `verify_slope_prior_weight` (rounds x tokens^2) sets how much
    # spread in k outweighs that assumption.
    verify_slope_share: float = 0.2
    verify_slope_prior_weight: float = 1.0
    draft_ahead: bool = False

    def __post_init__(self) -> None:
        if not (0 <= self.min_len <= self.initial_len <= self.max_len and self.max_len >= 1):
            raise ValueError(f"need 0 <= min_len <= initial_len <= max_len and max_len >= 1, got "
                             f"{self.min_len}, {self.initial_len}, {self.max_len}")
        if not 0 < self.decay_per_round <= 1:
            raise ValueError(f"decay_per_round must be in (0, 1], got {self.decay_per_round}")
        rates = (self.prior_acceptance_rate, self.prior_deep_acceptance_rate, self.prior_ahead_survival_rate,
                 self.verify_slope_share)
        if not all(0 <= rate <= 1 for rate in rates):
            raise ValueError(f"prior rates and verify_slope_share must be in [0, 1], got {rates}")
        if not (self.prior_weight > 0 and self.verify_slope_prior_weight > 0):
            raise ValueError("prior weights must be > 0")
        costs = (self.prior_target_tokens_per_draft_token, self.prior_draft_step_ms, self.prior_network_ms,
                 self.prior_verify_ms)
        if not all(math.isfinite(cost) and cost >= 0 for cost in costs):
            raise ValueError(f"cost priors must be finite and >= 0, got {costs}")


@dataclass(frozen=True)
class DraftLengthState:
    """Decayed sums over the rounds seen: each round scales them by `decay_per_round`, then adds its own."""

    rounds: float = 0.0
    position_reached: tuple[float, ...] = ()  # [i]: rounds that proposed position i+1 with all before it accepted
    position_accepted: tuple[float, ...] = ()  # [i]: rounds that accepted position i+1
    accepted_draft_tokens: float = 0.0
    extra_target_tokens: float = 0.0  # committed - 1: target tokens beyond the correction or bonus
    draft_step_rounds: float = 0.0  # rounds that timed a draft step
    draft_step_ms_sum: float = 0.0
    draft_overhead_ms_sum: float = 0.0  # critical-path draft ms beyond fresh tokens x step, over `rounds`
    network_ms_sum: float = 0.0
    draft_len_sum: float = 0.0  # draft_len and verify_ms moments, for the least-squares verify(k)
    draft_len_sq_sum: float = 0.0
    verify_ms_sum: float = 0.0
    draft_len_verify_ms_sum: float = 0.0
    full_acceptances: float = 0.0  # with draft-ahead: rounds that accepted all of k >= 1 tokens
    ahead_survivals: float = 0.0  # ... and whose ahead draft survived
    ahead_tokens_carried: int = 0  # last round's surviving ahead tokens: this proposal drafts that many fewer


@dataclass(frozen=True)
class RoundModel:
    """The current estimates behind the choice, in the cost model of the module docstring."""

    acceptance_by_position: tuple[float, ...]  # alpha_i = P(position i accepted | i - 1 accepted), i = 1..max_len
    target_tokens_per_draft_token: float
    draft_step_ms: float
    draft_overhead_ms: float
    network_ms: float
    verify_base_ms: float
    verify_ms_per_token: float
    ahead_survival_rate: float  # 0 without draft-ahead

    def expected_round(self, draft_len: int) -> tuple[float, float]:
        """(expected committed target tokens, expected ms) of a round proposing `draft_len` tokens."""
        if not 0 <= draft_len <= len(self.acceptance_by_position):
            raise ValueError(f"draft_len must be in [0, {len(self.acceptance_by_position)}], got {draft_len}")
        accepted_draft_tokens = 0.0
        all_accepted = 1.0
        for alpha in self.acceptance_by_position[:draft_len]:
            all_accepted *= alpha
            accepted_draft_tokens += all_accepted
        tokens = self.target_tokens_per_draft_token * accepted_draft_tokens + 1.0
        in_flight_ms = self.network_ms + self.verify_base_ms + self.verify_ms_per_token * draft_len
        drafting_ms = draft_len * self.draft_step_ms
        hidden_ms = all_accepted * self.ahead_survival_rate * min(drafting_ms, in_flight_ms)
        return tokens, max(in_flight_ms + self.draft_overhead_ms + drafting_ms - hidden_ms, MIN_ROUND_MS)


def observe(state: DraftLengthState, observation: RoundObservation, policy: DraftLengthPolicy) -> DraftLengthState:
    """The state after one more round."""
    decay = policy.decay_per_round
    draft_len = observation.draft_len
    accepted = observation.draft_tokens_accepted
    reached_positions = min(accepted + 1, draft_len)
    step_timed = observation.draft_step_ms > 0
    step_ms = observation.draft_step_ms if step_timed else _draft_step_ms(state, policy)
    fresh_draft_tokens = max(draft_len - state.ahead_tokens_carried, 0)
    network_ms = max(observation.round_trip_ms - observation.verify_ms, 0.0)  # separate clocks may overlap
    full_acceptance = policy.draft_ahead and draft_len >= 1 and accepted == draft_len
    return DraftLengthState(
        rounds=decay * state.rounds + 1,
        position_reached=tuple(decay * _at(state.position_reached, position) + (position < reached_positions)
                               for position in range(policy.max_len)),
        position_accepted=tuple(decay * _at(state.position_accepted, position) + (position < accepted)
                                for position in range(policy.max_len)),
        accepted_draft_tokens=decay * state.accepted_draft_tokens + accepted,
        extra_target_tokens=decay * state.extra_target_tokens + max(observation.committed_tokens - 1, 0),
        draft_step_rounds=decay * state.draft_step_rounds + step_timed,
        draft_step_ms_sum=decay * state.draft_step_ms_sum + (observation.draft_step_ms if step_timed else 0.0),
        draft_overhead_ms_sum=decay * state.draft_overhead_ms_sum + observation.draft_ms - fresh_draft_tokens * step_ms,
        network_ms_sum=decay * state.network_ms_sum + network_ms,
        draft_len_sum=decay * state.draft_len_sum + draft_len,
        draft_len_sq_sum=decay * state.draft_len_sq_sum + draft_len**2,
        verify_ms_sum=decay * state.verify_ms_sum + observation.verify_ms,
        draft_len_verify_ms_sum=decay * state.draft_len_verify_ms_sum + draft_len * observation.verify_ms,
        full_acceptances=decay * state.full_acceptances + full_acceptance,
        ahead_survivals=decay * state.ahead_survivals + (full_acceptance and observation.ahead_survived > 0),
        ahead_tokens_carried=observation.ahead_survived if policy.draft_ahead else 0,
    )


def round_model(state: DraftLengthState, policy: DraftLengthPolicy) -> RoundModel:
    """The estimates `state` implies, with the policy's priors where data is missing."""
    verify_base_ms, verify_ms_per_token = _verify_line(state, policy)
    return RoundModel(
        acceptance_by_position=_acceptance_by_position(state, policy),
        target_tokens_per_draft_token=_shrunk(state.extra_target_tokens, state.accepted_draft_tokens,
                                              policy.prior_target_tokens_per_draft_token, policy.prior_weight),
        draft_step_ms=_draft_step_ms(state, policy),
        draft_overhead_ms=max(state.draft_overhead_ms_sum / state.rounds, 0.0) if state.rounds > 0 else 0.0,
        network_ms=state.network_ms_sum / state.rounds if state.rounds > 0 else policy.prior_network_ms,
        verify_base_ms=verify_base_ms,
        verify_ms_per_token=verify_ms_per_token,
        ahead_survival_rate=_shrunk(state.ahead_survivals, state.full_acceptances, policy.prior_ahead_survival_rate,
                                    policy.prior_weight) if policy.draft_ahead else 0.0,
    )


def expected_round(state: DraftLengthState, policy: DraftLengthPolicy, draft_len: int) -> tuple[float, float]:
    """(expected committed target tokens, expected ms) of a round proposing `draft_len` tokens now."""
    return round_model(state, policy).expected_round(draft_len)


def choose_draft_len(state: DraftLengthState, policy: DraftLengthPolicy) -> int:
    """The k in [min_len, max_len] with the most expected committed tokens per ms; the shortest on ties."""
    if state.rounds == 0:
        return policy.initial_len
    model = round_model(state, policy)
    best_len, best_rate = policy.min_len, -1.0
    for draft_len in range(policy.min_len, policy.max_len + 1):
        tokens, round_ms = model.expected_round(draft_len)
        if tokens / round_ms > best_rate:
            best_len, best_rate = draft_len, tokens / round_ms
    return best_len


def _at(sums: tuple[float, ...], position: int) -> float:
    return sums[position] if position < len(sums) else 0.0


def _shrunk(total: float, weight: float, prior: float, prior_weight: float) -> float:
    return (total + prior_weight * prior) / (weight + prior_weight)


def _acceptance_by_position(state: DraftLengthState, policy: DraftLengthPolicy) -> tuple[float, ...]:
    # Positions 2.. shrink toward their pooled rate, not toward alpha_1: a controller that has shortened
    # its drafts after a few rejected first tokens must not read "deeper positions fail as often" into
    # data it never gathered (with bimodal acceptance they fail far less), or it never lengthens again.
    first = _shrunk(_at(state.position_accepted, 0), _at(state.position_reached, 0), policy.prior_acceptance_rate,
                    policy.prior_weight)
    deep_accepted = sum(state.position_accepted[1:])
    deep_reached = sum(state.position_reached[1:])
    pooled = _shrunk(deep_accepted, deep_reached, policy.prior_deep_acceptance_rate, policy.prior_weight)
    deep = [_shrunk(_at(state.position_accepted, position), _at(state.position_reached, position), pooled,
                    policy.prior_weight) for position in range(1, policy.max_len)]
    return (first, *deep)


def _draft_step_ms(state: DraftLengthState, policy: DraftLengthPolicy) -> float:
    if state.draft_step_rounds == 0:
        return policy.prior_draft_step_ms
    return state.draft_step_ms_sum / state.draft_step_rounds


def _verify_line(state: DraftLengthState, policy: DraftLengthPolicy) -> tuple[float, float]:
    """(base ms, ms per draft token) of verify(k): decayed least squares, its slope shrunk toward the prior share."""
    if state.rounds == 0:
        slope = policy.verify_slope_share * policy.prior_verify_ms / max(policy.initial_len, 1)
        return policy.prior_verify_ms - slope * policy.initial_len, slope
    mean_len = state.draft_len_sum / state.rounds
    mean_verify_ms = state.verify_ms_sum / state.rounds
    len_variance = max(state.draft_len_sq_sum / state.rounds - mean_len**2, 0.0)  # rounding can dip below 0
    covariance = state.draft_len_verify_ms_sum / state.rounds - mean_len * mean_verify_ms
    prior_slope = policy.verify_slope_share * mean_verify_ms / max(mean_len, 1.0)
    slope = (state.rounds * covariance + policy.verify_slope_prior_weight * prior_slope) / (
        state.rounds * len_variance + policy.verify_slope_prior_weight)
    slope = max(slope, 0.0)  # a longer proposal never verifies faster; noise must not reward long drafts
    return max(mean_verify_ms - slope * mean_len, 0.0), slope
