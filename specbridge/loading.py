"""Load a prepared pair's two halves: the ONNX draft with its vocabulary, the target with its own.

The one place that knows a `PreparedPair`'s layout; everything else receives loaded objects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cloud_verifier.target import TargetModel
from cloud_verifier.transfer import shared_vocabulary_map
from edge_client.client import load_edge_draft
from edge_client.drafter import Drafter
from shared.vocab import Vocab


def load_target(hf_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[TargetModel, Vocab]:
    return TargetModel.from_pretrained(hf_dir, device=device, dtype=dtype), Vocab.from_pretrained(hf_dir)


def load_drafter(onnx_dir: str | Path, *, variant: str = "fp32", threads: int | None = None,
                 target_vocab: Vocab | None = None) -> Drafter:
    """The edge drafter; given the target's vocabulary it also knows the shared ids for the draft_probs rule."""
    draft = load_edge_draft(onnx_dir, variant=variant, threads=threads)
    shared_ids = None if target_vocab is None else list(shared_vocabulary_map(draft.vocab.token_bytes, target_vocab.id_by_bytes))
    return Drafter(draft.runtime, draft.vocab, shared_ids=shared_ids)
