"""Pure numpy helpers that turn the draft's logits into probabilities, top-k laws and samples.

The drafter applies them to `DraftRuntime.feed` logits; no I/O, no global random state.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float32 probabilities over the last axis of `logits / temperature`; temperature 0 is the argmax point mass."""
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    logits = np.asarray(logits, dtype=np.float32)
    if temperature == 0:
        probs = np.zeros_like(logits)
        np.put_along_axis(probs, np.argmax(logits, axis=-1)[..., None], 1.0, axis=-1)
        return probs
    scaled = logits / np.float32(temperature)
    # Subtracting the max keeps exp finite; it cancels in the normalisation.
    exp = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most probable ids of a 1-D law and their probabilities, descending; ties go to the lower id."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 1 or probs.shape[0] == 0:
        raise ValueError(f"top_k needs a non-empty 1-D law, got shape {probs.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, probs.shape[0])
    kth_largest = probs[np.argpartition(-probs, k - 1)[k - 1]]
    # argpartition cuts ties at the k-th value arbitrarily; take the lowest tied ids instead.
    above = np.flatnonzero(probs > kth_largest)
    above = above[np.lexsort((above, -probs[above]))]
    tied = np.flatnonzero(probs == kth_largest)[: k - above.shape[0]]
    ids = np.concatenate([above, tied]).astype(np.int64)
    return ids, probs[ids]


def sample_categorical(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn from a 1-D law (normalised here, so any non-negative weights work)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 1 or probs.shape[0] == 0:
        raise ValueError(f"sample_categorical needs a non-empty 1-D law, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise ValueError("probabilities must be finite and non-negative")
    cumulative = np.cumsum(probs)
    total = cumulative[-1]
    if total <= 0:
        raise ValueError("probabilities sum to zero")
    index = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
    # Rounding can put the draw at the very top of the CDF; land on the last id with mass.
    return min(index, int(np.flatnonzero(probs)[-1]))
