"""DTW alignment of the draft's tokens with the proxy target tokens (TokenTiming, arXiv 2510.15545).

Runs on the verifier after re-tokenization: it tells each proxy target token j which draft
positions A(j) produced its text, which is what the probability transfer and the edge re-sync need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

_SPACE_MARKERS = str.maketrans("", "", "\u0120\u2581 ")  # Ġ (byte-level BPE), ▁ (SentencePiece), space
_INFINITY = float("inf")


def _strip_space_markers(token: str) -> str:
    return token.translate(_SPACE_MARKERS)


def token_distance(a: str, b: str) -> int:
    """Edit distance between two token strings, blind to how each tokenizer marks a space."""
    return Levenshtein.distance(_strip_space_markers(a), _strip_space_markers(b))


@dataclass(frozen=True)
class Alignment:
    path: tuple[tuple[int, int], ...]  # (draft position, target position), from (0, 0) to (n - 1, m - 1)
    cost: float  # sum of token_distance over the path


class _BandedTable:
    """DTW's cumulative costs, held only inside the band: row i keeps columns lows[i]..highs[i].

    Memory and distance computations grow with (rows x band), never with rows x cols; a cell
    outside the band reads as infinity, as it would in the full matrix.
    """

    def __init__(self, rows: int, cols: int, band: int) -> None:
        self.lows = [0] + [max(1, i - band) for i in range(1, rows + 1)]
        self.highs = [0] + [min(cols, i + band) for i in range(1, rows + 1)]
        self.rows: list[list[float]] = [[0.0]]  # row 0 holds only the origin (0, 0)

    def get(self, i: int, j: int) -> float:
        low = self.lows[i]
        row = self.rows[i]
        return row[j - low] if low <= j < low + len(row) else _INFINITY


def dtw_align(draft_tokens: Sequence[str], target_tokens: Sequence[str], window: int | None = 32) -> Alignment:
    """The minimum-cost monotone path between two token lists; steps are up, left or diagonal.

    `window` is a Sakoe-Chiba band |i - j| <= w, widened to |n - m| so that the corner stays
    reachable; None searches the whole matrix. Either list empty gives the empty path.
    """
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None, got {window}")
    rows, cols = len(draft_tokens), len(target_tokens)
    if rows == 0 or cols == 0:
        return Alignment(path=(), cost=0.0)
    band = max(rows, cols) if window is None else max(window, abs(rows - cols))
    drafts = [_strip_space_markers(t) for t in draft_tokens]
    targets = [_strip_space_markers(t) for t in target_tokens]
    table = _BandedTable(rows, cols, band)
    for i in range(1, rows + 1):
        low, high = table.lows[i], table.highs[i]
        here = [_INFINITY] * (high - low + 1)
        # One C call for the row's band of distances, then a plain-list loop (numpy's per-element
        # indexing costs more than the few dozen cells of a round).
        costs = cdist(drafts[i - 1 : i], targets[low - 1 : high], scorer=Levenshtein.distance)[0].tolist()
        above, above_low = table.rows[i - 1], table.lows[i - 1]
        for j in range(low, high + 1):
            k = j - 1 - above_low
            diagonal = above[k] if 0 <= k < len(above) else _INFINITY
            up = above[k + 1] if 0 <= k + 1 < len(above) else _INFINITY
            left = here[j - 1 - low] if j > low else _INFINITY
            best = diagonal if diagonal <= up and diagonal <= left else (up if up <= left else left)
            here[j - low] = costs[j - low] + best
        table.rows.append(here)
    return Alignment(path=_backtrack(table, rows, cols), cost=float(table.get(rows, cols)))


def _backtrack(table: _BandedTable, rows: int, cols: int) -> tuple[tuple[int, int], ...]:
    """Walk back from the corner; ties go to the diagonal (one-to-one pairs first), then up."""
    i, j = rows, cols
    path = [(i - 1, j - 1)]
    while (i, j) != (1, 1):
        diagonal, up, left = table.get(i - 1, j - 1), table.get(i - 1, j), table.get(i, j - 1)
        if diagonal <= up and diagonal <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i - 1, j - 1))
    path.reverse()
    return tuple(path)


def draft_positions_per_target(alignment: Alignment, num_target: int) -> tuple[tuple[int, ...], ...]:
    """A(j) for every target position j: the draft positions the path pairs with it, ascending."""
    positions: list[list[int]] = [[] for _ in range(num_target)]
    for draft_position, target_position in alignment.path:
        if not 0 <= target_position < num_target:
            raise ValueError(f"alignment reaches target position {target_position}, beyond {num_target} targets")
        positions[target_position].append(draft_position)
    return tuple(tuple(p) for p in positions)
