"""Re-tokenization: text that continues a committed token sequence becomes ids of another vocabulary.

The committed ids are the truth and are never re-encoded; only the new bytes are, encoded
together with an anchor of the last committed tokens so that seam merges and leading-space
conventions come out as the tokenizer would produce them. Every result is checked by bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.utf8 import incomplete_tail_length, starts_on_boundary
from shared.vocab import Vocab

ANCHOR_TOKENS = (3, 2, 1)


def _anchor_candidates(vocab: Vocab, committed_ids: Sequence[int]) -> list[list[int]]:
    """Tails of the committed ids that start on a character boundary and hold no special token."""
    candidates = []
    for count in ANCHOR_TOKENS:
        tail = list(committed_ids[-count:]) if count <= len(committed_ids) else []
        if len(tail) == count and not any(i in vocab.special_ids for i in tail) and starts_on_boundary(vocab.decode_bytes(tail)):
            candidates.append(tail)
    return candidates


def _encode_exact(vocab: Vocab, data: bytes) -> list[int] | None:
    """The tokenizer's own ids for whole-character bytes, or None where they would not give the bytes back.

    A SentencePiece dummy prefix turns text into " text"; encoding without the leading space
    we already have undoes that.
    """
    if incomplete_tail_length(data):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for candidate in (text, text[1:]) if text.startswith(" ") else (text,):
        ids = vocab.encode(candidate)
        if vocab.decode_bytes(ids) == data:
            return ids
    return None


def retokenize(vocab: Vocab, committed_ids: Sequence[int], new_bytes: bytes) -> list[int]:
    """Ids x with vocab.decode_bytes(x) == new_bytes, as the tokenizer would split them after the committed ids.

    Falls back to encoding the new bytes alone when the canonical encoding would merge across
    the seam (the committed ids cannot change), and to a longest-match split when the bytes
    are not whole characters.
    """
    if not new_bytes:
        return []
    for anchor in _anchor_candidates(vocab, committed_ids):
        ids = _encode_exact(vocab, vocab.decode_bytes(anchor) + new_bytes)
        if ids is not None and ids[: len(anchor)] == anchor:
            return ids[len(anchor) :]
    alone = _encode_exact(vocab, new_bytes)
    return alone if alone is not None else vocab.longest_match_ids(new_bytes)
