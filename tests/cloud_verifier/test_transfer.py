"""Probability transfer along the DTW path, and the shared-vocabulary map of the exact TLI rule."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from cloud_verifier.transfer import UNMATCHED_PROXY_PROB, shared_vocabulary_map, transfer_top_k

TARGET_ID_BY_BYTES = {b"a": 0, b"b": 1, b"c": 2, b" ": 3, b"ab": 4, b" a": 5}


def test_one_to_one_moves_mass_by_bytes_and_drops_the_unmatched() -> None:
    top_k = [[(b"ab", 0.6), (b"a", 0.3), (b"zz", 0.1)]]
    assert transfer_top_k(top_k, [(0,)], [4], TARGET_ID_BY_BYTES) == [{4: 0.6, 0: 0.3}]


def test_many_to_one_averages_the_aligned_draft_positions() -> None:
    top_k = [[(b"a", 0.8), (b"b", 0.2)], [(b"b", 0.5), (b"c", 0.5)]]
    (law,) = transfer_top_k(top_k, [(0, 1)], [0], TARGET_ID_BY_BYTES)
    assert law == pytest.approx({0: 0.4, 1: 0.35, 2: 0.25})


def test_one_to_many_gives_the_draft_mass_to_each_target_position() -> None:
    top_k = [[(b"a", 0.7), (b"b", 0.3)]]
    assert transfer_top_k(top_k, [(0,), (0,)], [0, 1], TARGET_ID_BY_BYTES) == [{0: 0.7, 1: 0.3}, {0: 0.7, 1: 0.3}]


def test_a_proxy_token_without_mass_falls_back_to_one_hot() -> None:
    # "abc" exists in no vocabulary here: the proxy "ab" gets no transferred mass.
    top_k = [[(b"abc", 0.9), (b"c", 0.1)]]
    assert transfer_top_k(top_k, [(0,)], [4], TARGET_ID_BY_BYTES) == [{2: 0.1, 4: UNMATCHED_PROXY_PROB}]


def test_an_empty_alignment_and_an_eos_get_the_fallback() -> None:
    eos_id = 6  # special tokens have no bytes, so nothing maps onto them
    assert transfer_top_k([], [()], [eos_id], TARGET_ID_BY_BYTES) == [{eos_id: UNMATCHED_PROXY_PROB}]


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError):
        transfer_top_k([[(b"a", 1.0)]], [(0,)], [0, 1], TARGET_ID_BY_BYTES)


entries = st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c", b" ", b"ab", b" a", b"x", b""]),
                             st.floats(0.0, 1.0)), max_size=5)


@given(top_k=st.lists(entries, min_size=1, max_size=4), data=st.data())
def test_every_proxy_token_has_positive_mass_and_no_mass_is_invented(top_k: list, data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 4))
    positions = [sorted(data.draw(st.sets(st.integers(0, len(top_k) - 1), min_size=1))) for _ in range(count)]
    proxy = data.draw(st.lists(st.integers(0, 6), min_size=count, max_size=count))
    laws = transfer_top_k(top_k, positions, proxy, TARGET_ID_BY_BYTES)
    for law, aligned, proxy_id in zip(laws, positions, proxy):
        assert law[proxy_id] > 0
        draft_mass = sum(p for i in aligned for _, p in top_k[i]) / len(aligned)
        transferred = sum(p for target_id, p in law.items() if not (target_id == proxy_id and p == UNMATCHED_PROXY_PROB))
        assert transferred <= draft_mass + 1e-9
        assert set(law) <= set(TARGET_ID_BY_BYTES.values()) | {proxy_id}


def test_shared_vocabulary_map_keeps_tokens_with_identical_bytes() -> None:
    draft_bytes = [b" ", b"a", b"b", b"c", b"bc", b""]
    assert shared_vocabulary_map(draft_bytes, TARGET_ID_BY_BYTES) == {0: 3, 1: 0, 2: 1, 3: 2}
