"""Committed bytes to text: whole characters only, origins kept, and a stop sequence cuts exactly where it would in the
whole output, however the bytes arrive."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_client.committed_text import CommittedText, Origin, TextPiece, Utf8Stream, cut_at_stop, find_stop

ALPHABET = "ab\n東🙂"


def test_utf8_stream_never_shows_a_broken_character() -> None:
    data = "a東🙂b".encode()
    for cut in range(len(data) + 1):
        stream = Utf8Stream()
        pieces = [stream.push(data[:cut]), stream.push(data[cut:]), stream.flush()]
        assert "".join(pieces) == "a東🙂b"
        assert "\ufffd" not in "".join(pieces)


def test_utf8_stream_flushes_an_unfinished_character_as_a_replacement() -> None:
    stream = Utf8Stream()
    assert stream.push(b"x\xe6\x9d") == "x"
    assert stream.flush() == "\ufffd"


@pytest.mark.parametrize(("text", "stops", "expected"), [
    ("abcd", ["cd", "b"], (1, "b")),  # "b" completes first though "cd" is listed first
    ("abcd", ["abc", "bc"], (0, "abc")),  # equal ends: the longer one, which starts earlier
    ("abab", ["ab"], (0, "ab")),
    ("abcd", ["x"], None),
    ("", ["x"], None),
])
def test_find_stop_takes_the_first_to_complete(text: str, stops: list[str], expected) -> None:
    assert find_stop(text, stops) == expected


def _feed(text: CommittedText, data: bytes, cuts: list[int], origins: list[Origin]) -> list[TextPiece]:
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    pieces = []
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        pieces += text.push(data[start:end], origins[index % len(origins)])
    return pieces + text.finish()


@given(output=st.text(ALPHABET, max_size=40), stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 200), max_size=12), origins=st.lists(st.sampled_from(Origin), min_size=1, max_size=3))
def test_streamed_text_is_the_whole_output_cut_at_the_stop(output: str, stops: list[str], cuts: list[int],
                                                           origins: list[Origin]) -> None:
    text = CommittedText(stops)
    pieces = _feed(text, output.encode(), cuts, origins)
    assert "".join(piece.text for piece in pieces) == cut_at_stop(output, stops)
    assert all(piece.text for piece in pieces)
    assert text.stopped == (find_stop(output, stops) is not None)


def test_pieces_keep_their_origin_and_a_split_character_goes_with_the_bytes_that_finish_it() -> None:
    text = CommittedText()
    assert text.push("ab東".encode()[:3], Origin.DRAFT) == [TextPiece("ab", Origin.DRAFT)]
    assert text.push("東".encode()[1:] + b"c", Origin.TARGET) == [TextPiece("東c", Origin.TARGET)]


def test_text_that_may_start_a_stop_sequence_waits() -> None:
    text = CommittedText(["\n\n"])
    assert text.push(b"x = 1\n", Origin.DRAFT) == [TextPiece("x = 1", Origin.DRAFT)]
    assert text.push(b"y", Origin.TARGET) == [TextPiece("\n", Origin.DRAFT)]  # the newline could not start "\n\n"
    assert text.push(b"\n\nz", Origin.TARGET) == [TextPiece("y", Origin.TARGET)]
    assert text.stop_found == "\n\n" and text.push(b"more", Origin.TARGET) == [] and text.finish() == []


def test_a_resumed_output_is_not_shown_again() -> None:
    text = CommittedText(shown="東".encode()[:2])
    assert text.push("東".encode()[2:] + b"!", Origin.TARGET) == [TextPiece("東!", Origin.TARGET)]


def test_an_empty_stop_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        CommittedText(["", "x"])
