"""Acceptance rules alone: greedy token for token, sampling rules exact at one position, warping as generate."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import chisquare
from transformers import GPT2Config, GPT2LMHeadModel

from cloud_verifier.verify import (Rule, Verdict, apply_rule, greedy_rule, point_mass_rule, rejection_rule, target_probs,
                                   warped_rule)
from shared.decoding import DecodeMode, DecodingConfig

ALPHA = 1e-3  # false-alarm rate of each frequency test; seeded, so deterministic
DRAWS = 20_000
EOS = 4
NO_EOS: frozenset[int] = frozenset()

P_FIRST = torch.tensor([0.1, 0.4, 0.25, 0.2, 0.05])
P_SECOND = torch.tensor([0.3, 0.0, 0.3, 0.3, 0.1])


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _one_hot_logits(*best: int, vocab: int = 5) -> torch.Tensor:
    logits = torch.zeros(len(best), vocab)
    logits[range(len(best)), list(best)] = 5.0
    return logits


def _p_value(samples: list[int], probs: torch.Tensor) -> float:
    counts = Counter(samples)
    support = [t for t in range(len(probs)) if probs[t] > 0]
    assert set(counts) <= set(support), f"sampled tokens outside the support: {set(counts) - set(support)}"
    expected = probs[support].double().numpy()
    return float(chisquare([counts[t] for t in support], expected / expected.sum() * len(samples)).pvalue)


def _first_token(verdict: Verdict, proposal: list[int]) -> int:
    return proposal[0] if verdict.accepted else verdict.next_token


def _recorded(rule: Rule, asked: list[int]) -> Rule:
    """`rule`, noting each position it asks for."""
    position = next(rule)
    while True:
        asked.append(position)
        try:
            position = rule.send((yield position))
        except StopIteration as done:
            return done.value


def _reads_every_row(count: int, seen: list[torch.Tensor]) -> Rule:
    for position in range(count):
        seen.append((yield position))
    return Verdict(accepted=count - 1, next_token=None)


# -- greedy --------------------------------------------------------------------------------------

def test_greedy_accepts_all_and_adds_the_bonus() -> None:
    assert apply_rule(_one_hot_logits(1, 2, 3), greedy_rule([1, 2], NO_EOS)) == Verdict(accepted=2, next_token=3)


def test_greedy_corrects_the_first_mismatch() -> None:
    assert apply_rule(_one_hot_logits(1, 2, 3), greedy_rule([1, 0], NO_EOS)) == Verdict(accepted=1, next_token=2)
    assert apply_rule(_one_hot_logits(1, 2, 3), greedy_rule([0, 2], NO_EOS)) == Verdict(accepted=0, next_token=1)


def test_greedy_empty_proposal_is_one_target_step() -> None:
    assert apply_rule(_one_hot_logits(3), greedy_rule([], NO_EOS)) == Verdict(accepted=0, next_token=3)


def test_greedy_no_bonus_after_an_accepted_eos() -> None:
    assert apply_rule(_one_hot_logits(1, EOS, 0), greedy_rule([1, EOS], frozenset({EOS}))) == Verdict(accepted=2, next_token=None)


def test_greedy_rejected_eos_is_corrected_and_a_correction_may_be_eos() -> None:
    assert apply_rule(_one_hot_logits(2, 0), greedy_rule([EOS], frozenset({EOS}))) == Verdict(accepted=0, next_token=2)
    assert apply_rule(_one_hot_logits(EOS, 0), greedy_rule([1], frozenset({EOS}))) == Verdict(accepted=0, next_token=EOS)


def test_greedy_ties_break_as_torch_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    first = int(torch.argmax(logits[0]))
    assert apply_rule(logits, greedy_rule([first], NO_EOS)) == Verdict(accepted=1, next_token=int(torch.argmax(logits[1])))
    assert apply_rule(logits, greedy_rule([3 - first], NO_EOS)) == Verdict(accepted=0, next_token=first)


def test_rows_must_match_the_proposal() -> None:
    with pytest.raises(ValueError):
        apply_rule(_one_hot_logits(1, 2), greedy_rule([1, 2], NO_EOS))
    with pytest.raises(ValueError):
        apply_rule(torch.full((2, 5), 0.2), point_mass_rule([7], NO_EOS, _generator()))
    with pytest.raises(ValueError):
        apply_rule(torch.full((2, 5), 0.2), rejection_rule([1], [], NO_EOS, _generator()))


@pytest.mark.parametrize(
    ("best", "proposal", "eos_ids", "rows_read"),
    [
        pytest.param((1, 2, 3, 4), [0, 2, 3], NO_EOS, [0], id="first rejected"),
        pytest.param((1, 2, 3, 4), [1, 2, 0], NO_EOS, [0, 1, 2], id="third rejected"),
        pytest.param((1, 2, 3, 4), [1, 2, 3], NO_EOS, [0, 1, 2, 3], id="all accepted, then the bonus"),
        pytest.param((1, EOS, 3, 4), [1, EOS, 3], frozenset({EOS}), [0, 1], id="accepted EOS"),
    ],
)
def test_greedy_reads_rows_left_to_right_and_stops_at_the_first_rejection(
        best: tuple[int, ...], proposal: list[int], eos_ids: frozenset[int], rows_read: list[int]) -> None:
    asked: list[int] = []
    apply_rule(_one_hot_logits(*best), _recorded(greedy_rule(proposal, eos_ids), asked))
    assert asked == rows_read


def test_sampling_rules_read_no_row_past_the_first_rejection() -> None:
    certain = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    for proposal, rows_read in (([0, 2], [0]), ([1, 0], [0, 1]), ([1, 2], [0, 1, 2])):
        asked: list[int] = []
        apply_rule(certain, _recorded(point_mass_rule(proposal, NO_EOS, _generator()), asked))
        assert asked == rows_read
        asked = []
        laws = [{token: 0.5, (token + 1) % 3: 0.5} for token in proposal]
        apply_rule(certain, _recorded(rejection_rule(proposal, laws, NO_EOS, _generator()), asked))
        assert asked == rows_read


# -- point mass ---------------------------------------------------------------------------------

@pytest.mark.parametrize("proposed", [0, 1, 4])
def test_point_mass_first_token_follows_p_whatever_is_proposed(proposed: int) -> None:
    probs, generator = torch.stack([P_FIRST, P_SECOND]), _generator(proposed)
    verdicts = [apply_rule(probs, point_mass_rule([proposed], NO_EOS, generator)) for _ in range(DRAWS)]
    assert _p_value([_first_token(v, [proposed]) for v in verdicts], P_FIRST) > ALPHA
    bonuses = [v.next_token for v in verdicts if v.accepted]
    assert abs(len(bonuses) / DRAWS - float(P_FIRST[proposed])) < 0.015
    assert _p_value(bonuses, P_SECOND) > ALPHA


def test_point_mass_certain_and_impossible_proposals() -> None:
    certain = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert apply_rule(certain, point_mass_rule([1], NO_EOS, _generator())) == Verdict(accepted=1, next_token=2)
    assert apply_rule(certain, point_mass_rule([0], NO_EOS, _generator())) == Verdict(accepted=0, next_token=1)


def test_point_mass_no_bonus_after_an_accepted_eos() -> None:
    probs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [0.2] * 5])
    assert apply_rule(probs, point_mass_rule([EOS], frozenset({EOS}), _generator())) == Verdict(accepted=1, next_token=None)


def test_sampling_is_reproducible_from_the_seed() -> None:
    probs = torch.stack([P_FIRST, P_SECOND, P_FIRST])
    runs = [[apply_rule(probs, point_mass_rule([1, 2], NO_EOS, generator)) for _ in range(50)]
            for generator in (_generator(7), _generator(7))]
    assert runs[0] == runs[1]


# -- rejection sampling -------------------------------------------------------------------------

def _rejection_first_tokens(p: torch.Tensor, q: dict[int, float], seed: int) -> list[int]:
    """x ~ q (the proposer's own randomness), then the rule; returns the first emitted token."""
    rng = np.random.default_rng(seed)
    ids, weights = list(q), np.array(list(q.values()))
    proposals = rng.choice(ids, size=DRAWS, p=weights / weights.sum())
    probs, generator = torch.stack([p, P_SECOND]), _generator(seed)
    return [_first_token(apply_rule(probs, rejection_rule([int(x)], [q], NO_EOS, generator)), [int(x)]) for x in proposals]


@pytest.mark.parametrize(
    "q",
    [
        pytest.param({0: 0.2, 1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2}, id="uniform"),
        pytest.param({0: 0.7, 3: 0.3}, id="sparse, misses most of p"),
        pytest.param({1: 0.5, 2: 0.5}, id="on the mode of p"),
    ],
)
def test_rejection_first_token_follows_p_when_q_is_the_law(q: dict[int, float]) -> None:
    assert _p_value(_rejection_first_tokens(P_FIRST, q, seed=len(q)), P_FIRST) > ALPHA


def test_rejection_with_p_zero_where_q_proposes() -> None:
    # A warped target (top-k cut) gives zero to tokens the draft still proposes: always rejected.
    assert _p_value(_rejection_first_tokens(P_SECOND, {1: 0.6, 0: 0.4}, seed=3), P_SECOND) > ALPHA


def test_rejection_accepts_everything_when_q_equals_p() -> None:
    probs = torch.stack([P_FIRST, P_SECOND])
    law = {t: float(P_FIRST[t]) for t in range(5)}
    generator = _generator()
    assert all(apply_rule(probs, rejection_rule([t], [law], NO_EOS, generator)).accepted == 1 for t in range(5) for _ in range(20))


def test_rejection_falls_back_to_p_when_the_residual_is_empty() -> None:
    # q~ summing past 1 (not a law) can leave max(0, p - q) all zero after a rejection.
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    generator = _generator()
    verdicts = [apply_rule(probs, rejection_rule([0], [{0: 1.0, 1: 1.0}], NO_EOS, generator)) for _ in range(200)]
    assert {v.next_token for v in verdicts if not v.accepted} <= {0, 1}
    assert {v.next_token for v in verdicts if v.accepted} == {2}


def test_rejection_refuses_a_token_outside_its_own_law() -> None:
    with pytest.raises(ValueError):
        apply_rule(torch.stack([P_FIRST, P_SECOND]), rejection_rule([2], [{1: 1.0}], NO_EOS, _generator()))


def test_rejection_no_bonus_after_an_accepted_eos() -> None:
    probs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [0.2] * 5])
    assert apply_rule(probs, rejection_rule([EOS], [{EOS: 0.5, 0: 0.5}], frozenset({EOS}), _generator())) == Verdict(1, None)


# -- warping, as generate(do_sample=True) does it ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # A wide initialisation spreads the logits, so top-k and top-p cut real mass.
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 10, 1.0), (1.0, 0, 0.8), (0.6, 12, 0.9), (1.7, 3, 0.5), (0.9, 1, 1.0)],
)
def test_target_probs_equal_generate_warping(tiny_lm: GPT2LMHeadModel, temperature: float, top_k: int, top_p: float) -> None:
    config = DecodingConfig(mode=DecodeMode.SAMPLE, temperature=temperature, top_k=top_k, top_p=top_p)
    input_ids = torch.tensor([[5, 17, 33, 2]])
    out = tiny_lm.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, max_new_tokens=4,
                           temperature=temperature, top_k=top_k, top_p=top_p, output_scores=True, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0)
    raw = torch.cat(out.logits)  # [steps, vocab], before any processor
    expected = torch.softmax(torch.cat(out.scores), dim=-1)  # what generate sampled from
    assert torch.equal(target_probs(raw, config), expected)
    seen: list[torch.Tensor] = []  # what a sampling rule is sent, row by row, from the same logits
    apply_rule(raw, warped_rule(_reads_every_row(len(raw), seen), config))
    assert torch.equal(torch.stack(seen), expected)


@settings(max_examples=50, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20), min_size=8, max_size=8),
    temperature=st.floats(0.05, 4.0),
    top_k=st.integers(0, 8),
    top_p=st.floats(0.05, 1.0),
)
def test_target_probs_are_distributions_within_top_k(logits: list[float], temperature: float, top_k: int, top_p: float) -> None:
    config = DecodingConfig(mode=DecodeMode.SAMPLE, temperature=temperature, top_k=top_k, top_p=top_p)
    scores = torch.tensor([logits], dtype=torch.float32)
    scaled = (scores[0] / temperature).tolist()  # what top-k and top-p compare, in float32
    probs = target_probs(scores, config)
    assert probs.dtype == torch.float32
    assert torch.isclose(probs.sum(), torch.tensor(1.0), atol=1e-5)
    kept = [value for value, p in zip(scaled, probs[0].tolist()) if p > 0]
    assert kept and (not top_k or min(kept) >= sorted(scaled, reverse=True)[top_k - 1])
    assert max(kept) == max(scaled)  # a top token survives (which of tied ones is HF's sort order)
