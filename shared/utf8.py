"""UTF-8 boundaries for byte streams that tokenizers cut anywhere.

Byte-level BPE and SentencePiece byte fallback split one character over several tokens; text
crosses the wire and the tokenizers only at character boundaries, so partial tails wait.
"""

from __future__ import annotations


def _sequence_length(lead_byte: int) -> int:
    if lead_byte < 0x80:
        return 1
    if lead_byte >> 5 == 0b110:
        return 2
    if lead_byte >> 4 == 0b1110:
        return 3
    if lead_byte >> 3 == 0b11110:
        return 4
    return 0  # a continuation byte or an invalid lead


def incomplete_tail_length(data: bytes) -> int:
    """Bytes at the end of `data` that start a UTF-8 character not yet complete (0 to 3)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte >> 6 == 0b10:
            continue
        needed = _sequence_length(byte)
        return back if needed > back else 0
    return 0


def split_complete(data: bytes) -> tuple[bytes, bytes]:
    """(longest prefix ending on a character boundary, the incomplete rest)."""
    tail = incomplete_tail_length(data)
    return (data[: len(data) - tail], data[len(data) - tail :]) if tail else (data, b"")


def starts_on_boundary(data: bytes) -> bool:
    return not data or data[0] >> 6 != 0b10
