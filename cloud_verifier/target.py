"""The target model: one forward over many sessions' new tokens, each against its own KV cache.

Sessions own their keys/values (a `RowCache`, kv_cache.py): a batched forward runs the decoder's
projections and MLPs over all rows at once and each row's attention over its own cache, appended
in place, with a mask from its real positions (so a sliding window sees what a lone decode sees).
The forward stops at the decoder's hidden states: the output head runs later, only on the rows the
acceptance rules read, and its logits stay on the target's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as transformers_logging

from cloud_verifier.kv_cache import ROW_ATTENTION, RowCache, RowsForward
from cloud_verifier.lazy_head import LazyLogits
from shared.errors import UserFacingError

SLIDING_LAYER = "sliding_attention"


class TargetModelError(UserFacingError, ValueError):
    """The target model cannot be loaded or asked what was asked."""


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
        # Our forwards attend row by row over each session's own cache; any other call (generate()) is plain SDPA.
        model.set_attn_implementation(ROW_ATTENTION)
        self._kv_bytes_per_token, layer_count = self._check_logits_are_the_models()
        self.layer_windows: list[int | None] = [
            self.sliding_window if self.layer_types and self.layer_types[layer] == SLIDING_LAYER else None
            for layer in range(layer_count)]

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> TargetModel:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TargetModelError(f"--device {device} asked for, but torch sees no CUDA device")
        # The weight-loading bar is transformers' noise in a server log, a benchmark's table or the demo.
        transformers_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        except (OSError, ValueError) as error:
            raise TargetModelError(f"cannot load target model from {path}: {str(error).splitlines()[0]}") from None
        torch_device = torch.device(device)
        return cls(model.to(torch_device), torch_device)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[k, hidden_size] decoder output -> [k, vocab] logits (float32, CPU): what the model's own forward applies."""
        logits = self._head(hidden)
        if self.final_logit_softcapping is not None:  # Gemma 2/3: the same operations in the same order as theirs
            logits = logits / self.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.final_logit_softcapping
        return logits.float()  # stays on the device: the rules move ids and the few probabilities they read

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
    def _check_logits_are_the_models(self) -> tuple[int, int]:
        """Refuse an architecture that post-processes its logits some other way (a scale, a cut vocabulary).

        Verifying with other logits than the model's own would silently stop being lossless. Returns the
        KV bytes of one position and the number of cached layers, read off the same forward.
        """
        ids = torch.tensor([[0, 1]], device=self.device)
        own = self.model(input_ids=ids, logits_to_keep=1).logits[0].float().cpu()
        decoded = self.decoder(input_ids=ids, use_cache=True)
        ours = self.logits(decoded.last_hidden_state[0, -1:]).cpu()  # one row: the model's own product
        if own.shape != ours.shape or not torch.allclose(own, ours):
            raise TargetModelError(f"{type(self.model).__name__}: decoder + output head do not reproduce the model's logits; "
                                   "the verifier does not support this architecture")
        layers = decoded.cache.layers
        return sum(t.element_size() * t.nelement() for layer in layers for t in (layer.keys, layer.values)) // ids.shape[1], len(layers)

    @torch.inference_mode()
    def forward(self, rows: Sequence[tuple[RowCache, Sequence[int]]]) -> list[LazyLogits]:
        """Each row's logits at its n_b new ids, computed when read; each row's cache grows by its n_b ids.

        A forward that raises leaves every row's cache as it was (the scheduler then retries rows alone).
        """
        if not rows or any(len(ids) == 0 for _, ids in rows):
            raise TargetModelError("every row of a target forward needs at least one new token")
        caches = [cache for cache, _ in rows]
        new_lengths = [len(ids) for _, ids in rows]
        padded_new = max(new_lengths)
        input_ids = torch.zeros((len(rows), padded_new), dtype=torch.long)
        position_ids = torch.zeros((len(rows), padded_new), dtype=torch.long)
        for row, (cache, ids) in enumerate(rows):
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise TargetModelError(f"token ids out of the target vocabulary [0, {self.vocab_size}): {bad[:5]}")
            input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            position_ids[row] = torch.arange(cache.length, cache.length + padded_new)
        rows_forward = RowsForward(caches, new_lengths, self.layer_windows, self.dtype, self.device)
        hidden = self.decoder(
            input_ids=input_ids.to(self.device),
            position_ids=position_ids.to(self.device),
            # Each row's own mask travels in `rows_forward`; a prepared 4D mask stops the decoder building one.
            attention_mask=torch.zeros((len(rows), 1, padded_new, 1), dtype=self.dtype, device=self.device),
            cache=rows_forward,
            rows_forward=rows_forward,
            use_cache=True,
        ).last_hidden_state
        rows_forward.commit()
        return [LazyLogits(hidden[row, :new], self.logits) for row, new in enumerate(new_lengths)]

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one position over all layers, in the model's dtype."""
        return self._kv_bytes_per_token
