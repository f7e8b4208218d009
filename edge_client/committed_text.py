"""Committed bytes -> text for people: whole characters, tagged by origin, cut before the first stop sequence.

The edge client pushes each verdict's bytes here (the accepted draft bytes, then the target's
correction) and streams what comes out. Pure: no I/O, no clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from shared.utf8 import split_complete


class Origin(Enum):
    DRAFT = "draft"  # draft tokens the verifier accepted
    TARGET = "target"  # the target's own tokens: corrections, bonus tokens, all of a target-only output


@dataclass(frozen=True)
class TextPiece:
    text: str
    origin: Origin


class Utf8Stream:
    """Turns a byte stream cut anywhere into text, holding back an incomplete trailing character."""

    def __init__(self) -> None:
        self._pending = b""

    def push(self, data: bytes) -> str:
        complete, self._pending = split_complete(self._pending + data)
        return complete.decode("utf-8", errors="replace")

    def flush(self) -> str:
        rest, self._pending = self._pending, b""
        return rest.decode("utf-8", errors="replace")


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The stop sequence that completes first in `text` (at equal ends, the longer one), found at or after
    `start`: (the index it starts at, the stop sequence), or None.

    "Completes first" is what a decoder checking its output after every token would stop on.
    """
    best: tuple[tuple[int, int], str] | None = None
    for stop in stops:
        index = text.find(stop, start)
        if index >= 0 and (best is None or (index + len(stop), index) < best[0]):
            best = ((index + len(stop), index), stop)
    return None if best is None else (best[0][1], best[1])


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first stop sequence to complete in it (the stop sequence excluded)."""
    found = find_stop(text, stops)
    return text if found is None else text[: found[0]]


class CommittedText:
    """Text pieces from committed bytes; with stop sequences, the last `len(longest) - 1` characters are held
    back until they cannot start one, so no piece ever shows text that the cut removes.
    """

    def __init__(self, stop: Sequence[str] = (), *, shown: bytes = b"") -> None:
        """`shown`: output an earlier call already showed (a resumed generation); only its unfinished
        character carries over."""
        if any(not sequence for sequence in stop):
            raise ValueError("a stop sequence must not be empty")
        self.stop = tuple(stop)
        self.stop_found: str | None = None  # the stop sequence the output ends before, once one appeared
        self._hold = max(map(len, self.stop), default=1) - 1
        self._utf8 = Utf8Stream()
        self._text = self._utf8.push(shown)  # every whole character so far
        self._shown = len(self._text)  # characters of _text handed out
        self._pending: list[TextPiece] = []  # _text[_shown:] by origin
        self._last_origin = Origin.TARGET

    @property
    def stopped(self) -> bool:
        return self.stop_found is not None

    def push(self, data: bytes, origin: Origin) -> list[TextPiece]:
        """The pieces that `data` makes showable; nothing once a stop sequence appeared."""
        self._last_origin = origin
        return self._add(self._utf8.push(data), origin, final=False)

    def finish(self) -> list[TextPiece]:
        """The end of the output: whatever was held back (an unfinished character shows as U+FFFD)."""
        return self._add(self._utf8.flush(), self._last_origin, final=True)

    def _add(self, text: str, origin: Origin, *, final: bool) -> list[TextPiece]:
        if self.stopped:
            return []
        # A stop sequence that completes now ends in the new text, so it starts at most _hold characters before it.
        search_from = max(0, len(self._text) - self._hold)
        if text:
            self._text += text
            self._pending.append(TextPiece(text, origin))
        found = find_stop(self._text, self.stop, search_from)
        if found is not None:
            self.stop_found = found[1]
            return self._release(found[0])
        return self._release(len(self._text) if final else len(self._text) - self._hold)

    def _release(self, end: int) -> list[TextPiece]:
        """Hand out the pending text up to character `end` of the output."""
        pieces = []
        while self._pending and self._shown < end:
            piece = self._pending[0]
            take = min(len(piece.text), end - self._shown)
            pieces.append(TextPiece(piece.text[:take], piece.origin))
            self._shown += take
            if take == len(piece.text):
                self._pending.pop(0)
            else:
                self._pending[0] = TextPiece(piece.text[take:], piece.origin)
        return pieces
