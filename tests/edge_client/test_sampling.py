"""Softmax, top-k and categorical sampling over numpy laws."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_client.sampling import sample_categorical, softmax, top_k

finite_logits = arrays(np.float32, st.integers(1, 50), elements=st.floats(-30, 30, width=32))


@given(finite_logits, st.floats(0.05, 5.0))
def test_softmax_is_a_law_ordered_like_the_logits(logits: np.ndarray, temperature: float) -> None:
    probs = softmax(logits, temperature)
    assert probs.dtype == np.float32
    assert np.isclose(probs.sum(), 1.0, atol=1e-5) and (probs >= 0).all()
    assert probs[np.argmax(logits)] == probs.max()


def test_softmax_temperature_zero_is_the_argmax_point_mass() -> None:
    probs = softmax(np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 2.0]]), 0.0)
    np.testing.assert_array_equal(probs, [[0, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError):
        softmax(np.zeros(3), -1.0)


@given(arrays(np.float32, st.integers(1, 40), elements=st.sampled_from([0.0, 0.1, 0.25, 0.5])), st.integers(1, 50))
def test_top_k_is_sorted_descending_with_lowest_ids_on_ties(probs: np.ndarray, k: int) -> None:
    ids, top_probs = top_k(probs, k)
    assert ids.dtype == np.int64 and top_probs.dtype == np.float32
    assert len(ids) == min(k, len(probs)) == len(set(ids.tolist()))
    expected = sorted(range(len(probs)), key=lambda token_id: (-probs[token_id], token_id))[: len(ids)]
    assert ids.tolist() == expected
    np.testing.assert_array_equal(top_probs, probs[ids])


def test_sample_categorical_follows_the_law_and_skips_zero_mass() -> None:
    rng = np.random.default_rng(0)
    probs = np.array([0.0, 0.2, 0.0, 0.8, 0.0])
    draws = np.bincount([sample_categorical(probs, rng) for _ in range(4000)], minlength=5)
    assert draws[[0, 2, 4]].sum() == 0
    assert abs(draws[3] / 4000 - 0.8) < 0.03
    with pytest.raises(ValueError):
        sample_categorical(np.zeros(3), rng)
    with pytest.raises(ValueError):
        sample_categorical(np.array([0.5, -0.1]), rng)
