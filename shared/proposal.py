"""What the edge proposes each round and what the verifier answers, independent of the wire.

The draft is text (bytes, since a draft token may end inside a character) plus, per draft
token, its sparse top-k alternatives as (bytes, probability); the verifier never needs the
draft's vocabulary. The gRPC codec and the in-process loop both carry exactly these records.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DraftToken:
    token_bytes: bytes
    # Descending. Under the DRAFT_PROBS rule this is exactly the law the token was drawn from.
    top_k: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class DraftProposal:
    tokens: tuple[DraftToken, ...]
    ends_with_eos: bool = False

    @property
    def text_bytes(self) -> bytes:
        return b"".join(t.token_bytes for t in self.tokens)


@dataclass(frozen=True)
class RoundOutcome:
    """The verifier's answer to one proposal: what got committed, in both vocabularies' common currency."""

    accepted_ids: tuple[int, ...]  # proxy target tokens accepted as proposed
    next_id: int | None  # the correction or bonus token; None after an accepted EOS or at the budget
    committed_bytes: bytes  # the UTF-8 bytes the new ids add to the output (may end mid-character)
    proposed_count: int  # proxy target tokens the proposal became
    draft_tokens_accepted: int  # draft tokens whose bytes the committed bytes fully cover
    finished: bool

    @property
    def new_ids(self) -> tuple[int, ...]:
        return self.accepted_ids + ((self.next_id,) if self.next_id is not None else ())
