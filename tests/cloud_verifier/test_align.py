"""DTW alignment: the path is monotone and complete, minimal in cost, and respects its band."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings, strategies as st

from cloud_verifier.align import Alignment, draft_positions_per_target, dtw_align, token_distance

tokens = st.lists(st.text(alphabet="ab cĠ▁", min_size=0, max_size=3), min_size=1, max_size=6)
short_tokens = st.lists(st.text(alphabet="abĠ", min_size=0, max_size=3), min_size=1, max_size=4)


def _monotone_paths(rows: int, cols: int) -> Iterator[tuple[tuple[int, int], ...]]:
    """Every path from (0, 0) to (rows - 1, cols - 1) with up, left and diagonal steps."""
    def walk(i: int, j: int, path: tuple[tuple[int, int], ...]) -> Iterator[tuple[tuple[int, int], ...]]:
        if (i, j) == (rows - 1, cols - 1):
            yield path
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < rows and j + dj < cols:
                yield from walk(i + di, j + dj, path + ((i + di, j + dj),))

    yield from walk(0, 0, ((0, 0),))


def _path_cost(draft: Sequence[str], target: Sequence[str], path: Sequence[tuple[int, int]]) -> int:
    return sum(token_distance(draft[i], target[j]) for i, j in path)


def _assert_well_formed(alignment: Alignment, rows: int, cols: int) -> None:
    path = alignment.path
    assert path[0] == (0, 0) and path[-1] == (rows - 1, cols - 1)
    for (i, j), (next_i, next_j) in zip(path, path[1:]):
        assert (next_i - i, next_j - j) in ((1, 1), (1, 0), (0, 1))


def test_space_markers_cost_nothing() -> None:
    assert token_distance("Ġthe", "▁the") == token_distance(" the", "the") == 0
    assert token_distance("Ġab", "abc") == 1
    assert token_distance("", "abc") == 3


def test_identical_tokens_align_on_the_diagonal() -> None:
    words = ["def", "Ġadd", "(", "a", ",", "Ġb", "):"]
    alignment = dtw_align(words, words)
    assert alignment.path == tuple((i, i) for i in range(len(words)))
    assert alignment.cost == 0.0


def test_ties_prefer_the_diagonal() -> None:
    assert dtw_align(["a", "a"], ["a", "a"]).path == ((0, 0), (1, 1))


def test_one_draft_token_to_many_target_tokens() -> None:
    alignment = dtw_align(["Ġhello", "Ġworld"], ["▁hel", "lo", "▁world"])
    assert draft_positions_per_target(alignment, 3) == ((0,), (0,), (1,))


def test_many_draft_tokens_to_one_target_token() -> None:
    alignment = dtw_align(["a", "bc", "Ġd"], ["abc", " d"])
    assert draft_positions_per_target(alignment, 2) == ((0, 1), (2,))


def test_different_space_conventions_align_token_for_token() -> None:
    alignment = dtw_align(["Ġthe", "Ġcat", "Ġsat"], ["▁the", "▁cat", "▁sat"])
    assert alignment.path == ((0, 0), (1, 1), (2, 2)) and alignment.cost == 0.0


def test_empty_inputs_give_an_empty_path() -> None:
    for draft, target in (([], []), (["a"], []), ([], ["a"])):
        assert dtw_align(draft, target) == Alignment(path=(), cost=0.0)
    assert draft_positions_per_target(dtw_align([], ["a"]), 1) == ((),)


def test_negative_window_is_rejected() -> None:
    with pytest.raises(ValueError):
        dtw_align(["a"], ["a"], window=-1)


@given(draft=tokens, target=tokens, window=st.one_of(st.none(), st.integers(0, 4)))
def test_path_is_monotone_covers_both_and_costs_what_it_says(draft: list[str], target: list[str], window: int | None) -> None:
    alignment = dtw_align(draft, target, window=window)
    _assert_well_formed(alignment, len(draft), len(target))
    assert alignment.cost == _path_cost(draft, target, alignment.path)
    positions = draft_positions_per_target(alignment, len(target))
    assert all(positions) and sorted({i for p in positions for i in p}) == list(range(len(draft)))


@settings(max_examples=150)
@given(draft=short_tokens, target=short_tokens)
def test_cost_is_minimal_over_all_monotone_paths(draft: list[str], target: list[str]) -> None:
    best = min(_path_cost(draft, target, path) for path in _monotone_paths(len(draft), len(target)))
    assert dtw_align(draft, target, window=None).cost == best


@given(draft=tokens, target=tokens, window=st.integers(0, 3))
def test_band_is_respected_and_widened_to_the_length_gap(draft: list[str], target: list[str], window: int) -> None:
    band = max(window, abs(len(draft) - len(target)))
    assert all(abs(i - j) <= band for i, j in dtw_align(draft, target, window=window).path)


def test_band_forces_the_diagonal_when_zero() -> None:
    # Unbanded, skipping the mismatched middle is cheaper; a zero band allows only the diagonal.
    draft, target = ["x", "abcdef", "y"], ["abcdef", "x", "y"]
    assert dtw_align(draft, target, window=0).path == ((0, 0), (1, 1), (2, 2))
    assert dtw_align(draft, target, window=None).cost < dtw_align(draft, target, window=0).cost


def test_positions_beyond_the_target_count_are_an_error() -> None:
    with pytest.raises(ValueError):
        draft_positions_per_target(dtw_align(["a"], ["a", "b"]), 1)


def test_the_band_bounds_memory_never_the_full_matrix() -> None:
    """2000 x 2000 tokens in a band of 4: a full cost matrix would hold 4M cells (> 30 MB as floats)."""
    draft = ["ab"] * 2000
    target = ["ab"] * 2000
    tracemalloc.start()
    try:
        alignment = dtw_align(draft, target, window=4)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert alignment.path == tuple((i, i) for i in range(2000)) and alignment.cost == 0
    assert peak_bytes < 4 * 1024 * 1024
