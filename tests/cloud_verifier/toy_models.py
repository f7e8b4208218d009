"""Toy autoregressive models with explicit bigram tables, behind the product's own model interfaces.

Two deliberately different tokenizers (target: byte-level BPE with merges "ab", " a"; draft:
SentencePiece-style characters plus "bc", and a byte-fallback `<0x20>` that means the same space
as `▁`). `BigramDraftRuntime` is what `Drafter` reads through the DraftRuntime interface and
`BigramTarget` what a VerifierSession's forward needs (TargetModel.forward), so the statistical
tests run the real drafter, loop and verifier; only the models are tables whose laws are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cloud_verifier.kv_cache import RowCache
from cloud_verifier.lazy_head import LazyLogits
from shared.vocab import Vocab

# Draft ids of the two tokens whose bytes are both b" ": one token law, two table columns.
DRAFT_SPACE_IDS = (0, 6)


def target_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "Ġa": 5, "<|endoftext|>": 6}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "a")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def draft_tokenizer() -> PreTrainedTokenizerFast:
    # The tokenizer itself never emits <0x20> (no byte fallback is needed for a space); the draft
    # model samples it, as a SentencePiece model with byte fallback may.
    vocab = {"▁": 0, "a": 1, "b": 2, "c": 3, "bc": 4, "</s>": 5, "<0x20>": 6}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c")]))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")


def bigram_table(size: int, seed: int, zeros: tuple[tuple[int, int], ...] = (),
                 boost: tuple[tuple[int, float], ...] = ()) -> np.ndarray:
    """Row r: the next-token law after token r; every entry >= 0.03 except the listed zeros.

    `boost` adds (column, weight) to every row before normalising: a column the model favours.
    """
    table = np.random.default_rng(seed).dirichlet(np.full(size, 2.0), size=size) + 0.03
    for column, weight in boost:
        table[:, column] += weight
    for row, column in zeros:
        table[row, column] = 0.0
    return table / table.sum(axis=1, keepdims=True)


def bigram_logits(table: np.ndarray) -> np.ndarray:
    """Row r: the logits after token r."""
    with np.errstate(divide="ignore"):  # a zero-probability transition is a -inf logit
        return np.log(table)


class BigramDraftRuntime:
    """The DraftRuntime interface over a bigram table: the logits after id i are log table[i]."""

    def __init__(self, table: np.ndarray, eos_ids: frozenset[int]) -> None:
        self._log_table = bigram_logits(table).astype(np.float32)
        self._eos_ids = eos_ids
        self._fed: list[int] = []

    @property
    def vocab_size(self) -> int:
        return self._log_table.shape[0]

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def num_cached(self) -> int:
        return len(self._fed)

    def feed(self, ids: Sequence[int]) -> np.ndarray:
        if not ids:
            raise ValueError("feed needs at least one token id")
        self._fed.extend(ids)
        return self._log_table[list(ids)]

    def rollback(self, keep: int) -> None:
        if not 0 <= keep <= len(self._fed):
            raise ValueError(f"rollback keep={keep} outside [0, {len(self._fed)}]")
        del self._fed[keep:]

    def reset(self) -> None:
        self._fed = []


class BigramTarget:
    """TargetModel.forward's contract over a bigram table: row i of a forward's logits is log table[ids[i]].

    The "hidden state" of a position is its token id and the head looks its row up, so LazyLogits
    computes rows on demand as it does for a real model; each RowCache holds its row's ids as keys
    and values, so it grows and crops like a real cache.
    """

    def __init__(self, table: np.ndarray) -> None:
        self._log_table = torch.from_numpy(bigram_logits(table)).to(torch.float32)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._log_table[hidden[:, 0].long()]

    def forward(self, rows: Sequence[tuple[RowCache, Sequence[int]]]) -> list[LazyLogits]:
        results = []
        for cache, ids in rows:
            new = torch.tensor(list(ids), dtype=torch.float32).reshape(1, 1, -1, 1)
            cache.write(0, new, new)
            cache.length += len(ids)
            results.append(LazyLogits(new[0, 0], self.head))
        return results


@dataclass(frozen=True)
class ToyPair:
    target_vocab: Vocab
    draft_vocab: Vocab
    target_table: np.ndarray  # p(next target token | previous target token)
    draft_table: np.ndarray  # q(next draft token | previous draft token), unlike p on purpose


def toy_pair() -> ToyPair:
    target_vocab, draft_vocab = Vocab.from_tokenizer(target_tokenizer()), Vocab.from_tokenizer(draft_tokenizer())
    return ToyPair(
        target_vocab=target_vocab,
        draft_vocab=draft_vocab,
        # c never follows c, so the outcomes with zero probability must never be sampled.
        target_table=bigram_table(target_vocab.size, seed=1, zeros=((2, 2),)),
        # The draft favours the space, spread over its two ids, more than the target does: a law that
        # counts one of them only understates q(" ") where the target's p(" ") is below it.
        draft_table=bigram_table(draft_vocab.size, seed=2, boost=tuple((i, 0.2) for i in DRAFT_SPACE_IDS)),
    )
