"""Sampled speculative decoding across two tokenizers is lossless: the statistical proof.

Toy bigram models with explicit tables over two deliberately different toy tokenizers (target:
byte-level BPE with merges "ab", " a"; draft: SentencePiece-style characters plus "bc"). A small
speculative loop (draft -> bytes -> retokenize -> target rows -> acceptance rule -> commit)
samples the first target tokens many times; chi-square compares the frequencies with the exact
target sequence law. The exact rules must pass; the DTW-transferred q~ must fail.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cloud_verifier.align import draft_positions_per_target, dtw_align
from cloud_verifier.transfer import shared_vocabulary_map, transfer_top_k
from cloud_verifier.verify import Verdict, target_probs, verify_point_mass, verify_rejection
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.retokenize import retokenize
from shared.vocab import TokenFamily, Vocab

ALPHA = 1e-3  # false-alarm rate of each exactness test; seeded, so a pass is reproducible
NUM_SAMPLES = 100_000
NUM_SAMPLES_WARPED = 50_000  # top-k/top-p leave 25 outcomes (not 247): fewer draws fill their cells
NUM_SAMPLES_NEGATIVE = 10_000  # enough: the biased rule scores chi-square > 10,000 on 246 dof here
OUTCOME_TOKENS = 3  # the first target tokens sampled per run (fewer when EOS comes first)
MAX_DRAFT_TOKENS = 4
MIN_EXPECTED_COUNT = 5.0  # smaller chi-square cells are pooled, as the test's approximation needs
PROMPT_TEXT = "a"


def _target_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "Ġa": 5, "<|endoftext|>": 6}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "a")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def _draft_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"▁": 0, "a": 1, "b": 2, "c": 3, "bc": 4, "</s>": 5}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c")]))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")


def _bigram_table(size: int, seed: int, zeros: tuple[tuple[int, int], ...] = ()) -> np.ndarray:
    """Row r: the next-token law after token r; every entry >= 0.03 except the listed zeros."""
    table = np.random.default_rng(seed).dirichlet(np.full(size, 2.0), size=size) + 0.03
    for row, column in zeros:
        table[row, column] = 0.0
    return table / table.sum(axis=1, keepdims=True)


@dataclass
class ToyPair:
    target: Vocab
    draft: Vocab
    target_table: np.ndarray  # p(next target token | previous target token)
    draft_table: np.ndarray  # q(next draft token | previous draft token), unlike p on purpose
    prompt_ids: tuple[int, ...]
    target_eos: int
    draft_eos: int
    # The loop's deterministic steps, memoised: the state space is tiny and 10^5 runs revisit it.
    _memo: dict[tuple, object] = field(default_factory=dict)

    def memo(self, key: tuple, compute: Callable[[], object]) -> object:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def target_rows(self, config: DecodingConfig, ids: tuple[int, ...]) -> torch.Tensor:
        def compute() -> torch.Tensor:
            with np.errstate(divide="ignore"):
                logits = torch.from_numpy(np.log(self.target_table[list(ids)])).to(torch.float32)
            return target_probs(logits, config)

        return self.memo(("rows", config, ids), compute)

    def draft_state(self, committed_ids: tuple[int, ...]) -> int:
        """The draft's last token after re-syncing on the committed text (the edge encodes it)."""
        return self.memo(("state", committed_ids),
                         lambda: self.draft.encode(self.target.decode_bytes(committed_ids).decode())[-1])

    def proxy_ids(self, committed_ids: tuple[int, ...], new_bytes: bytes) -> tuple[int, ...]:
        return self.memo(("proxy", committed_ids, new_bytes),
                         lambda: tuple(retokenize(self.target, committed_ids, new_bytes)))


@pytest.fixture(scope="module")
def pair() -> ToyPair:
    target, draft = Vocab.from_tokenizer(_target_tokenizer()), Vocab.from_tokenizer(_draft_tokenizer())
    return ToyPair(
        target=target,
        draft=draft,
        # c never follows c, so the outcomes with zero probability must never be sampled.
        target_table=_bigram_table(target.size, seed=1, zeros=((2, 2),)),
        draft_table=_bigram_table(draft.size, seed=2),
        prompt_ids=tuple(target.encode(PROMPT_TEXT)),
        target_eos=target.tokenizer.eos_token_id,
        draft_eos=draft.tokenizer.eos_token_id,
    )


# -- the toy speculative loop ------------------------------------------------------------------

@dataclass(frozen=True)
class DraftRound:
    draft_ids: tuple[int, ...]
    proxy_ids: tuple[int, ...]
    proposal_probs: tuple[dict[int, float], ...] | None  # None: the point-mass rule


class Drafter:
    """Samples k draft tokens from the draft table; its randomness is its own, never the verifier's."""

    def __init__(self, pair: ToyPair, rule: AcceptanceRule, seed: int) -> None:
        self.pair, self.rule, self.rng = pair, rule, random.Random(seed)
        table = pair.draft_table
        if rule is AcceptanceRule.DRAFT_PROBS:
            # TLI: only tokens that are one target token each, from the renormalised law.
            shared = shared_vocabulary_map(pair.draft.token_bytes, pair.target.id_by_bytes)
            table = np.zeros_like(table)
            table[:, list(shared)] = pair.draft_table[:, list(shared)]
            table /= table.sum(axis=1, keepdims=True)
            self.to_target = shared
            self.laws = [{shared[d]: float(p) for d, p in enumerate(row) if p > 0} for row in table]
        self.table = table
        self.cumulative = [list(accumulate(row)) for row in table.tolist()]

    def propose(self, committed_ids: tuple[int, ...], draft_len: int, budget: int) -> DraftRound:
        """k draft tokens, as at most `budget` proxy target tokens with their proposal laws."""
        pair, state = self.pair, self.pair.draft_state(committed_ids)
        states, draft_ids = [], []
        for _ in range(draft_len):
            states.append(state)
            state = self.rng.choices(range(len(self.table)), cum_weights=self.cumulative[state])[0]
            draft_ids.append(state)
            if state == pair.draft_eos:
                break
        if self.rule is AcceptanceRule.DRAFT_PROBS:
            proxy = tuple(self.to_target[d] for d in draft_ids[:budget])
            return DraftRound(tuple(draft_ids), proxy, tuple(self.laws[s] for s in states[:budget]))
        ends_with_eos = bool(draft_ids) and draft_ids[-1] == pair.draft_eos
        text_ids = draft_ids[:-1] if ends_with_eos else draft_ids
        proxy = pair.proxy_ids(committed_ids, pair.draft.decode_bytes(text_ids)) + ((pair.target_eos,) if ends_with_eos else ())
        proxy = proxy[:budget]
        if self.rule is AcceptanceRule.POINT_MASS:
            return DraftRound(tuple(draft_ids), proxy, None)
        key = ("transfer", tuple(states), tuple(draft_ids), proxy)
        return DraftRound(tuple(draft_ids), proxy, pair.memo(key, lambda: self._transferred(states, text_ids, proxy)))

    def _transferred(self, states: list[int], text_ids: list[int], proxy: tuple[int, ...]) -> tuple[dict[int, float], ...]:
        """TokenTiming's q~: the draft's whole law per position, moved along the DTW path."""
        draft, target = self.pair.draft, self.pair.target
        alignment = dtw_align([draft.token_text(d) for d in text_ids], [target.token_text(t) for t in proxy])
        positions = draft_positions_per_target(alignment, len(proxy))
        top_k = [sorted(((draft.token_bytes[d], float(p)) for d, p in enumerate(self.table[s])), key=lambda e: -e[1])
                 for s in states]
        return tuple(transfer_top_k(top_k, positions, proxy, target.id_by_bytes))


def _verify(pair: ToyPair, config: DecodingConfig, committed_ids: tuple[int, ...], planned: DraftRound,
            generator: torch.Generator) -> Verdict:
    rows = pair.target_rows(config, (committed_ids[-1], *planned.proxy_ids))
    eos = pair.target.eos_ids
    if planned.proposal_probs is None:
        return verify_point_mass(rows, planned.proxy_ids, eos, generator)
    return verify_rejection(rows, planned.proxy_ids, planned.proposal_probs, eos, generator)


def sample_outcomes(pair: ToyPair, config: DecodingConfig, num_samples: int, seed: int) -> Counter[tuple[int, ...]]:
    """Frequencies of the first OUTCOME_TOKENS target tokens (or fewer, ending in EOS)."""
    drafter = Drafter(pair, config.rule, seed)
    generator = torch.Generator().manual_seed(seed)
    counts: Counter[tuple[int, ...]] = Counter()
    prompt_length = len(pair.prompt_ids)
    for _ in range(num_samples):
        committed, draft_len = pair.prompt_ids, 2
        while len(committed) - prompt_length < OUTCOME_TOKENS and committed[-1] != pair.target_eos:
            # Verifying m tokens can emit m + 1: never propose past the budget (as the session does).
            budget = OUTCOME_TOKENS - (len(committed) - prompt_length) - 1
            planned = drafter.propose(committed, draft_len, budget)
            verdict = _verify(pair, config, committed, planned, generator)
            committed += planned.proxy_ids[: verdict.accepted] + ((verdict.next_token,) if verdict.next_token is not None else ())
            # HF's draft-length heuristic, counted in target tokens.
            full = verdict.accepted == len(planned.proxy_ids)
            draft_len = min(MAX_DRAFT_TOKENS, draft_len + 2) if full else max(1, draft_len - 1)
        counts[committed[prompt_length:]] += 1
    return counts


# -- the exact law and the test ----------------------------------------------------------------

def exact_outcome_law(pair: ToyPair, config: DecodingConfig) -> dict[tuple[int, ...], float]:
    every_row = tuple(range(pair.target.size))
    rows = pair.target_rows(config, every_row).double().numpy()
    law: dict[tuple[int, ...], float] = {}

    def extend(prefix: tuple[int, ...], probability: float) -> None:
        if len(prefix) == OUTCOME_TOKENS or (prefix and prefix[-1] == pair.target_eos):
            law[prefix] = probability
            return
        previous = prefix[-1] if prefix else pair.prompt_ids[-1]
        for token, p in enumerate(rows[previous]):
            if p > 0:
                extend(prefix + (token,), probability * p)

    extend((), 1.0)
    return law


def chi_square_p_value(counts: Counter[tuple[int, ...]], law: dict[tuple[int, ...], float]) -> float:
    impossible = [outcome for outcome in counts if outcome not in law]
    assert not impossible, f"sampled outcomes the target gives zero probability: {impossible[:5]}"
    total = sum(counts.values())
    outcomes = sorted(law, key=law.get)
    expected = np.array([law[o] for o in outcomes]) / sum(law.values()) * total
    observed = np.array([counts[o] for o in outcomes], dtype=float)
    # Pool every outcome expected fewer than 5 times (the rarest first) into one cell of >= 5.
    pooled = max(1, int((expected < MIN_EXPECTED_COUNT).sum()))
    while pooled < len(expected) and expected[:pooled].sum() < MIN_EXPECTED_COUNT:
        pooled += 1
    expected = np.concatenate(([expected[:pooled].sum()], expected[pooled:]))
    observed = np.concatenate(([observed[:pooled].sum()], observed[pooled:]))
    return float(chisquare(observed, expected).pvalue)


def _config(rule: AcceptanceRule, **sampling: float) -> DecodingConfig:
    return DecodingConfig(mode=DecodeMode.SAMPLE, rule=rule, **sampling)


POINT_MASS = _config(AcceptanceRule.POINT_MASS)
DRAFT_PROBS = _config(AcceptanceRule.DRAFT_PROBS)
POINT_MASS_WARPED = _config(AcceptanceRule.POINT_MASS, temperature=0.7, top_k=3, top_p=0.85)
RUNS = {POINT_MASS: (11, NUM_SAMPLES), DRAFT_PROBS: (12, NUM_SAMPLES), POINT_MASS_WARPED: (13, NUM_SAMPLES_WARPED)}  # seed, draws


@pytest.fixture(scope="module")
def sampled(pair: ToyPair) -> Callable[[DecodingConfig], Counter[tuple[int, ...]]]:
    """Outcome counts per exact configuration, sampled once per module (the slow part)."""
    cache: dict[DecodingConfig, Counter[tuple[int, ...]]] = {}

    def counts(config: DecodingConfig) -> Counter[tuple[int, ...]]:
        if config not in cache:
            seed, num_samples = RUNS[config]
            cache[config] = sample_outcomes(pair, config, num_samples, seed)
        return cache[config]

    return counts


def test_toy_tokenizers_are_two_families_that_split_differently(pair: ToyPair) -> None:
    assert pair.target.family is TokenFamily.BYTE_LEVEL_BPE
    assert pair.draft.family is TokenFamily.SENTENCEPIECE
    text = "abc ab"
    assert pair.target.decode_bytes(pair.target.encode(text)) == pair.draft.decode_bytes(pair.draft.encode(text)) == text.encode()
    assert len(pair.target.encode(text)) != len(pair.draft.encode(text))
    assert not np.allclose(pair.target_table[:6, :6], pair.draft_table[:6, :6])


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(POINT_MASS, id="point_mass"),
        pytest.param(DRAFT_PROBS, id="draft_probs"),
        pytest.param(POINT_MASS_WARPED, id="point_mass_warped"),
    ],
)
def test_exact_rules_sample_the_target_law(pair: ToyPair, sampled: Callable[[DecodingConfig], Counter[tuple[int, ...]]],
                                           config: DecodingConfig) -> None:
    law = exact_outcome_law(pair, config)
    p_value = chi_square_p_value(sampled(config), law)
    assert p_value > ALPHA, f"{config.rule.value}: chi-square p = {p_value:.3g} over {len(law)} outcomes"


def test_next_token_frequencies_follow_warped_target_probs(pair: ToyPair,
                                                          sampled: Callable[[DecodingConfig], Counter[tuple[int, ...]]]) -> None:
    """The first emitted token alone, against target_probs' row with temperature, top-k and top-p set."""
    row = pair.target_rows(POINT_MASS_WARPED, (pair.prompt_ids[-1],))[0].double().numpy()
    assert (row == 0).sum() >= pair.target.size - 3  # the warpers really cut the support
    first: Counter[tuple[int, ...]] = Counter()
    for outcome, count in sampled(POINT_MASS_WARPED).items():
        first[outcome[:1]] += count
    p_value = chi_square_p_value(first, {(token,): float(p) for token, p in enumerate(row) if p > 0})
    assert p_value > ALPHA, f"first-token chi-square p = {p_value:.3g}"


def test_dtw_transferred_probabilities_are_not_exact(pair: ToyPair) -> None:
    """The negative control: the same test must reject q~ in min(1, p/q~) (ALGORITHM.md)."""
    config = _config(AcceptanceRule.DTW_TRANSFER_APPROX)
    counts = sample_outcomes(pair, config, NUM_SAMPLES_NEGATIVE, seed=15)
    p_value = chi_square_p_value(counts, exact_outcome_law(pair, config))
    assert p_value < 1e-9, f"the approximate rule passed the exactness test (p = {p_value:.3g}): the test has no power"
