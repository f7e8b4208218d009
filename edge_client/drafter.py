"""The edge drafter: proposes the next few tokens as text plus sparse top-k laws, and re-syncs by bytes.

It keeps the draft model's context equal to the committed text (prompt + output) in the draft
vocabulary. After each verification it keeps the drafted tokens the committed bytes confirm,
rolls the KV cache back to them, and feeds the rest of the committed text re-tokenized.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from edge_client.draft_runtime import DraftRuntime
from edge_client.sampling import sample_categorical, softmax, top_k
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
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
        self._fed_ids: list[int] = []  # exactly what the KV cache holds
        self._next_logits: np.ndarray | None = None  # the draft's logits after _fed_ids
        self._drafted_ids: list[int] = []

    def start(self, prompt: str) -> None:
        """Begin a session: the prompt as the draft's own tokenizer encodes it, specials included."""
        self.context_ids = list(self.vocab.tokenizer(prompt)["input_ids"])
        self.runtime.reset()
        self._fed_ids = []
        self._drafted_ids = []
        self._feed_to(self.context_ids)

    def _feed_to(self, ids: list[int]) -> None:
        """Make the cache hold `ids`, re-using the longest common prefix with what it holds now."""
        common = 0
        for fed, wanted in zip(self._fed_ids, ids):
            if fed != wanted:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token is fed, for the next logits
        self.runtime.rollback(common)
        self._next_logits = self.runtime.feed(ids[common:])[-1]
        self._fed_ids = list(ids)

    def _choose(self, logits: np.ndarray, config: DecodingConfig, rng: np.random.Generator) -> tuple[int, DraftToken]:
        probs = softmax(logits, config.temperature if config.mode is DecodeMode.SAMPLE else 1.0)
        if config.mode is DecodeMode.SAMPLE and config.rule is AcceptanceRule.DRAFT_PROBS:
            if self.shared_mask is None:
                raise ValueError("the draft_probs rule needs the shared-vocabulary ids")
            probs = np.where(self.shared_mask[: probs.shape[0]], probs, 0.0)
            probs[list(i for i in self.eos_ids if i < probs.shape[0])] = 0.0
        ids, top_probs = top_k(probs, self.top_k_size)
        if config.mode is DecodeMode.SAMPLE and config.rule is not AcceptanceRule.POINT_MASS:
            top_probs = top_probs / top_probs.sum()
            chosen = int(ids[sample_categorical(top_probs, rng)])
        else:
            # Greedy, and the point-mass rule, whose acceptance sum_x r(x) p(x) is best served by the draft's mode.
            chosen = int(ids[0])
        table = self.vocab.token_bytes
        law = tuple((table[i], float(p)) for i, p in zip(ids.tolist(), top_probs.tolist()) if table[i] and p > 0)
        return chosen, DraftToken(token_bytes=table[chosen], top_k=law)

    def propose(self, draft_len: int, config: DecodingConfig, rng: np.random.Generator) -> DraftProposal:
        tokens: list[DraftToken] = []
        self._drafted_ids = []
        logits = self._next_logits
        for step in range(draft_len):
            chosen, token = self._choose(logits, config, rng)
            if chosen in self.eos_ids:
                return DraftProposal(tokens=tuple(tokens), ends_with_eos=True)
            tokens.append(token)
            self._drafted_ids.append(chosen)
            if step + 1 < draft_len:
                logits = self.runtime.feed([chosen])[-1]
                self._fed_ids.append(chosen)
        return DraftProposal(tokens=tuple(tokens))

    def commit(self, committed_bytes: bytes) -> None:
        """Advance the context by what the verifier committed, keeping the drafted tokens it confirms."""
        kept = 0
        covered = 0
        for token_id in self._drafted_ids:
            token_bytes = self.vocab.token_bytes[token_id]
            if committed_bytes[covered : covered + len(token_bytes)] != token_bytes or not token_bytes:
                break
            covered += len(token_bytes)
            kept += 1
        confirmed = self.context_ids + self._drafted_ids[:kept]
        self.context_ids = confirmed + retokenize(self.vocab, confirmed, committed_bytes[covered:])
        self._drafted_ids = []
        self._feed_to(self.context_ids)
