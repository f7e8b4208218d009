"""The edge drafter: proposes the next few tokens as text (plus sparse top-k laws where the rule uses
them), drafts ahead while a verification is in flight, and re-syncs on the committed bytes.

It keeps the draft model's context equal to the committed text (prompt + output) in the draft
vocabulary, followed by the tokens drafted beyond it. After each verdict the drafted tokens whose
bytes the committed text confirms stay (KV cache included); when the committed text ends exactly
on a drafted token's boundary, the tokens drafted after it continue that text and survive into the
next proposal (draft-ahead). The rest is rolled back, and the unmatched committed bytes are fed
re-tokenized.
"""

from __future__ import annotations

import threading
from collections.abc import Collection

import numpy as np

from edge_client.draft_runtime import DraftRuntime
from edge_client.sampling import sample_categorical, softmax, top_k
from shared.decoding import DecodeMode, DecodingConfig
from shared.proposal import DraftProposal, DraftToken
from shared.retokenize import retokenize
from shared.vocab import Vocab


class Drafter:
    def __init__(self, runtime: DraftRuntime, vocab: Vocab, *, top_k_size: int = 8,
                 shared_ids: Collection[int] | None = None) -> None:
        """`shared_ids`: draft ids whose bytes are single target tokens (needed by the DRAFT_PROBS rule)."""
        self.runtime = runtime
        self.vocab = vocab
        self.top_k_size = top_k_size
        self.shared_mask = None
        if shared_ids is not None:
            self.shared_mask = np.zeros(runtime.vocab_size, dtype=bool)
            self.shared_mask[[i for i in shared_ids if i < runtime.vocab_size]] = True
        self.eos_ids = frozenset(vocab.eos_ids) | runtime.eos_ids
        self.context_ids: list[int] = []  # the committed text in draft ids
        self._drafted: list[tuple[int, DraftToken]] = []  # drafted beyond the context, in order
        self._draft_eos = False  # the draft chose its EOS right after the last drafted token
        self._proposed = 0  # leading drafted tokens sent in the proposal awaiting its verdict
        self._seed = 0
        self._resyncs = 0  # commits that re-tokenized committed bytes no drafted token covered
        self._fed_ids: list[int] = []  # exactly what the KV cache holds
        self._next_logits: np.ndarray | None = None  # the draft's logits after _fed_ids

    @property
    def ahead_count(self) -> int:
        """Tokens drafted beyond the proposal in flight (or ready for the next proposal)."""
        return len(self._drafted) - self._proposed

    def start(self, prompt: str, seed: int | None = None) -> None:
        """Begin a session: the prompt as the draft's own tokenizer encodes it, specials included.

        `seed` fixes the draws of a sampled draft (unset: fresh entropy).
        """
        self._seed = seed if seed is not None else int(np.random.SeedSequence().entropy)
        self._resyncs = 0
        self.context_ids = list(self.vocab.tokenizer(prompt)["input_ids"])
        self.runtime.reset()
        self._fed_ids = []
        self._next_logits = None
        self._drafted = []
        self._draft_eos = False
        self._proposed = 0
        self._feed_to(self.context_ids)

    def _feed_to(self, ids: list[int]) -> None:
        """Make the cache hold `ids` with the logits after them, re-using the longest common prefix."""
        if self._next_logits is not None and ids == self._fed_ids:
            return
        common = 0
        for fed, wanted in zip(self._fed_ids, ids):
            if fed != wanted:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token is fed, for the next logits
        self.runtime.rollback(common)
        self._next_logits = self.runtime.feed(ids[common:])[-1]
        self._fed_ids = list(ids)

    def _position_rng(self) -> np.random.Generator:
        """The draws for the next drafted position: one stream per (seed, re-sync, position).

        A token drafted ahead draws exactly what its position would draw after the verdict, as long as
        no re-sync comes between. A stream is never reused once a verdict has rolled drafted tokens back,
        so no draw depends on an earlier one whose outcome the verdict revealed (exactness needs each
        proposal drawn afresh from its law). Whether a re-sync happens can depend on how far the draft
        got ahead, so a seeded sampled draft is reproducible only without draft-ahead.
        """
        return np.random.default_rng((self._seed, self._resyncs, len(self.context_ids) + len(self._drafted)))

    def _choose(self, logits: np.ndarray, config: DecodingConfig) -> tuple[int, DraftToken]:
        probs = softmax(logits, config.temperature if config.mode is DecodeMode.SAMPLE else 1.0)
        if config.uses_draft_probs:
            if self.shared_mask is None:
                raise ValueError("the draft_probs rule needs the shared-vocabulary ids")
            probs = np.where(self.shared_mask[: probs.shape[0]], probs, 0.0)
            probs[list(i for i in self.eos_ids if i < probs.shape[0])] = 0.0
        table = self.vocab.token_bytes
        if not config.reads_draft_law:
            # Greedy, and the point-mass rule, whose acceptance sum_x r(x) p(x) is best served by the
            # draft's mode; neither reads a law, so none crosses the wire.
            chosen = int(np.argmax(probs))
            return chosen, DraftToken(token_bytes=table[chosen])
        ids, top_probs = top_k(probs, self.top_k_size)
        top_probs = top_probs / top_probs.sum()
        chosen = int(ids[sample_categorical(top_probs, self._position_rng())])
        law = tuple((table[i], float(p)) for i, p in zip(ids.tolist(), top_probs.tolist()) if table[i] and p > 0)
        return chosen, DraftToken(token_bytes=table[chosen], top_k=law)

    def _draft_one(self, config: DecodingConfig) -> bool:
        """Draft the next token after everything drafted so far; False once the draft has chosen EOS."""
        if self._draft_eos:
            return False
        self._feed_to(self.context_ids + [token_id for token_id, _ in self._drafted])
        chosen, token = self._choose(self._next_logits, config)
        if chosen in self.eos_ids:
            self._draft_eos = True
            return False
        self._drafted.append((chosen, token))
        return True

    def propose(self, draft_len: int, config: DecodingConfig) -> DraftProposal:
        """The next `draft_len` tokens: those drafted ahead and still valid first, then fresh ones."""
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        while len(self._drafted) < draft_len and self._draft_one(config):
            pass
        self._proposed = min(draft_len, len(self._drafted))
        tokens = tuple(token for _, token in self._drafted[: self._proposed])
        return DraftProposal(tokens=tokens, ends_with_eos=self._draft_eos and self._proposed == len(self._drafted))

    def draft_ahead(self, max_tokens: int, config: DecodingConfig, stop: threading.Event) -> int:
        """Keep drafting past the proposal in flight, as if all of it will be accepted, until `stop` is set,
        `max_tokens` lie ahead or the draft chooses EOS; returns how many tokens lie ahead.

        Runs while the event loop awaits the verdict; the caller waits for it to return before `commit`.
        """
        while not stop.is_set() and self.ahead_count < max_tokens and self._draft_one(config):
            pass
        return self.ahead_count

    def commit(self, committed_bytes: bytes) -> int:
        """Advance the context by what the verifier committed; returns how many drafted tokens survive
        (they continue the committed text exactly and open the next proposal)."""
        kept = 0
        covered = 0
        for token_id, _ in self._drafted:
            token_bytes = self.vocab.token_bytes[token_id]
            if not token_bytes or committed_bytes[covered : covered + len(token_bytes)] != token_bytes:
                break
            covered += len(token_bytes)
            kept += 1
        confirmed = self.context_ids + [token_id for token_id, _ in self._drafted[:kept]]
        unmatched = committed_bytes[covered:]
        if unmatched:
            self.context_ids = confirmed + retokenize(self.vocab, confirmed, unmatched)
            self._drafted = []
            self._draft_eos = False
            self._resyncs += 1
        else:
            self.context_ids = confirmed
            self._drafted = self._drafted[kept:]
        self._proposed = 0
        return len(self._drafted)
