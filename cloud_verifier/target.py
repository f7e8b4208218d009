"""The target model: one forward over many sessions' new tokens, each against its own KV cache.

Sessions own their keys/values (a `RowCache`); a batched forward left-pads the caches into one
batch, builds the attention masks from each row's real positions (so padding never shifts a
causal or sliding window), and hands every row its extended cache back. The forward stops at the
decoder's hidden states: the output head runs later, only on the rows the acceptance rules read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from cloud_verifier.lazy_head import LazyLogits

SLIDING_LAYER = "sliding_attention"


class TargetModelError(ValueError):
    """The target model cannot be loaded or asked what was asked."""


@dataclass
class RowCache:
    """One session's keys and values, per layer [1, kv_heads, length, head_dim]; empty before prefill."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def crop(self, keep: int) -> None:
        if not 0 <= keep <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {keep}")
        self.layers = [(k[:, :, :keep], v[:, :, :keep]) for k, v in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(k.element_size() * k.nelement() * 2 for k, _ in self.layers)


def _row_masks(cache_lengths: Sequence[int], new_lengths: Sequence[int], window: int | None, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """Additive [B, 1, N, P+N] mask; key slots hold real positions or -1 for padding."""
    padded_past = max(cache_lengths)
    padded_new = max(new_lengths)
    batch = len(cache_lengths)
    key_pos = torch.full((batch, padded_past + padded_new), -1, dtype=torch.long)
    query_pos = torch.zeros((batch, padded_new), dtype=torch.long)
    for row, (past, new) in enumerate(zip(cache_lengths, new_lengths)):
        key_pos[row, padded_past - past : padded_past] = torch.arange(past)
        key_pos[row, padded_past : padded_past + new] = torch.arange(past, past + new)
        query_pos[row] = torch.arange(past, past + padded_new)
    keys = key_pos[:, None, :]
    queries = query_pos[:, :, None]
    allowed = (keys >= 0) & (keys <= queries)
    if window is not None:
        allowed &= queries - keys < window
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(device)


class TargetModel:
    """A causal LM that verifies proposals for many sessions per forward."""

    def __init__(self, model: PreTrainedModel, device: torch.device) -> None:
        self.model = model.eval()
        self.device = device
        self.config = model.config.get_text_config()
        self.decoder = model.get_decoder()
        self.output_head = model.get_output_embeddings()
        self.final_logit_softcapping: float | None = getattr(self.config, "final_logit_softcapping", None)
        self.vocab_size: int = self.output_head.weight.shape[0]
        self.layer_types: list[str] | None = getattr(self.config, "layer_types", None)
        self.sliding_window: int | None = getattr(self.config, "sliding_window", None) if self.layer_types and SLIDING_LAYER in self.layer_types else None
        self.dtype = next(model.parameters()).dtype
        self._check_logits_are_the_models()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> TargetModel:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TargetModelError(f"--device {device} asked for, but torch sees no CUDA device")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        except (OSError, ValueError) as error:
            raise TargetModelError(f"cannot load target model from {path}: {str(error).splitlines()[0]}") from None
        torch_device = torch.device(device)
        return cls(model.to(torch_device), torch_device)

    def _masks(self, cache_lengths: Sequence[int], new_lengths: Sequence[int]) -> torch.Tensor | dict[str, torch.Tensor]:
        full = _row_masks(cache_lengths, new_lengths, None, self.dtype, self.device)
        if self.sliding_window is None:
            return full
        return {"full_attention": full,
                SLIDING_LAYER: _row_masks(cache_lengths, new_lengths, self.sliding_window, self.dtype, self.device)}

    def _batch_cache(self, caches: Sequence[RowCache]) -> DynamicCache:
        padded_past = max(c.length for c in caches)
        if padded_past == 0:
            return DynamicCache()
        template = next(c for c in caches if c.length)
        layers = []
        for layer, (k_ref, _) in enumerate(template.layers):
            shape = (len(caches), k_ref.shape[1], padded_past, k_ref.shape[3])
            keys = torch.zeros(shape, dtype=k_ref.dtype, device=k_ref.device)
            values = torch.zeros_like(keys)
            for row, cache in enumerate(caches):
                if cache.length:
                    keys[row, :, padded_past - cache.length :] = cache.layers[layer][0][0]
                    values[row, :, padded_past - cache.length :] = cache.layers[layer][1][0]
            layers.append((keys, values))
        return DynamicCache(layers)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[k, hidden_size] decoder output -> [k, vocab] logits (float32, CPU): what the model's own forward applies."""
        logits = self._head(hidden)
        if self.final_logit_softcapping is not None:  # Gemma 2/3: the same operations in the same order as theirs
            logits = logits / self.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.final_logit_softcapping
        return logits.float().cpu()

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head; several rows as W @ h^T rather than h @ W^T.

        MKL runs h @ W^T with 2-8 rows of a wide vocabulary 2-4x slower than W @ h^T on this CPU class
        (Gemma-3's head, one thread: 133 vs 33 ms for 2 rows, 193 vs 49 for 3, 119 vs 88 for 8), and a
        verification reads 2-8 rows. Either blocked product differs from a one-row product in the last bits
        only (<= 5e-5 on Gemma-3's logits, the same as h @ W^T over a block); one row, as in target-only
        decoding, goes through the model's own head unchanged.
        """
        head = self.output_head
        if hidden.shape[0] == 1 or not isinstance(head, torch.nn.Linear):
            return head(hidden)
        logits = torch.mm(head.weight, hidden.T).T
        return logits if head.bias is None else logits + head.bias

    @torch.inference_mode()
    def _check_logits_are_the_models(self) -> None:
        """Refuse an architecture that post-processes its logits some other way (a scale, a cut vocabulary).

        Verifying with other logits than the model's own would silently stop being lossless.
        """
        ids = torch.tensor([[0, 1]], device=self.device)
        own = self.model(input_ids=ids, logits_to_keep=1).logits[0].float().cpu()
        ours = self.logits(self.decoder(input_ids=ids).last_hidden_state[0, -1:])  # one row: the model's own product
        if own.shape != ours.shape or not torch.allclose(own, ours):
            raise TargetModelError(f"{type(self.model).__name__}: decoder + output head do not reproduce the model's logits; "
                                   "the verifier does not support this architecture")

    @torch.inference_mode()
    def forward(self, rows: Sequence[tuple[RowCache, Sequence[int]]]) -> list[LazyLogits]:
        """Each row's logits at its n_b new ids, computed when read; each row's cache grows by its n_b ids."""
        if not rows or any(len(ids) == 0 for _, ids in rows):
            raise TargetModelError("every row of a target forward needs at least one new token")
        caches = [cache for cache, _ in rows]
        cache_lengths = [c.length for c in caches]
        new_lengths = [len(ids) for _, ids in rows]
        padded_past, padded_new = max(cache_lengths), max(new_lengths)
        input_ids = torch.zeros((len(rows), padded_new), dtype=torch.long)
        position_ids = torch.zeros((len(rows), padded_new), dtype=torch.long)
        for row, (_, ids) in enumerate(rows):
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise TargetModelError(f"token ids out of the target vocabulary [0, {self.vocab_size}): {bad[:5]}")
            input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            position_ids[row] = torch.arange(cache_lengths[row], cache_lengths[row] + padded_new)
        batch_cache = self._batch_cache(caches)
        hidden = self.decoder(
            input_ids=input_ids.to(self.device),
            position_ids=position_ids.to(self.device),
            attention_mask=self._masks(cache_lengths, new_lengths),
            cache=batch_cache,
            use_cache=True,
        ).last_hidden_state
        results = []
        for row, cache in enumerate(caches):
            start = padded_past - cache.length
            stop = padded_past + new_lengths[row]
            cache.layers = [(layer.keys[row : row + 1, :, start:stop].clone(), layer.values[row : row + 1, :, start:stop].clone())
                            for layer in batch_cache.layers]
            results.append(LazyLogits(hidden[row, : new_lengths[row]], self.logits))
        return results
