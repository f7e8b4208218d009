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


def retokenize(vocab: Vocab, committed_ids: Sequence[int], new_bytes: bytes) -> list[int]:
    """Ids x with vocab.decode_bytes(x) == new_bytes, as the tokenizer would split them after the committed ids.

    Falls back to a valid longest-match split when the canonical encoding would merge across
    the seam (the committed ids cannot change) or the bytes are not yet whole characters.
    """
    if not new_bytes:
        return []
    for anchor in _anchor_candidates(vocab, committed_ids):
        anchor_bytes = vocab.decode_bytes(anchor)
        joined = anchor_bytes + new_bytes
        if incomplete_tail_length(joined):
            break
        try:
            text = joined.decode("utf-8")
        except UnicodeDecodeError:
            break
        ids = vocab.encode(text)
        if ids[: len(anchor)] == anchor and vocab.decode_bytes(ids[len(anchor) :]) == new_bytes:
            return ids[len(anchor) :]
    if not committed_ids or committed_ids[-1] in vocab.special_ids:
        try:
            ids = vocab.encode(new_bytes.decode("utf-8"))
        except UnicodeDecodeError:
            ids = []
        if ids and vocab.decode_bytes(ids) == new_bytes:
            return ids
    return vocab.longest_match_ids(new_bytes)
