"""The edge draft model: an exported causal LM run by onnxruntime with a KV cache kept in numpy.

It is the first stage of the pipeline (the drafter proposes from its logits) and loads what
`specbridge.export` writes; it imports numpy and onnxruntime only, never torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import onnxruntime as ort

from shared.errors import UserFacingError

MANIFEST_NAME = "specbridge_draft.json"
MANIFEST_VERSION = 1

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"


def past_names(num_layers: int) -> list[str]:
    """Graph input names of the cache, flat as key, value per layer."""
    return [f"past_key_values.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Graph output names of the updated cache, in the order of `past_names`."""
    return [f"present.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def external_data_path(model_path: Path) -> Path:
    """Where the exporter puts a graph's weights: beside it, as NAME.onnx.data."""
    return model_path.with_name(model_path.name + ".data")


def onnx_bytes(model_path: Path) -> int:
    """Size on disk of a graph plus its external weights, if any."""
    data_path = external_data_path(model_path)
    return model_path.stat().st_size + (data_path.stat().st_size if data_path.exists() else 0)


class DraftModelError(UserFacingError):
    """An exported draft directory is missing, incomplete or does not match its manifest."""


class ContextOverflowError(UserFacingError, ValueError):
    """Feeding would take the context past the positions the draft model was trained for."""


class Variant(StrEnum):
    FP32 = "fp32"
    INT8 = "int8"


@dataclass(frozen=True)
class DraftManifest:
    """What the edge needs to know about an exported draft; written beside the model as JSON."""

    architecture: str
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # width of the logits, which may exceed the tokenizer's vocabulary
    eos_ids: tuple[int, ...]
    max_positions: int | None
    dtype: str
    model_file: str
    int8_file: str | None
    tokenizer_files: tuple[str, ...]
    format_version: int = MANIFEST_VERSION

    def write(self, onnx_dir: Path) -> Path:
        path = onnx_dir / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, onnx_dir: Path) -> DraftManifest:
        onnx_dir = Path(onnx_dir)
        if not onnx_dir.is_dir():
            raise DraftModelError(f"draft model directory not found: {onnx_dir}")
        path = onnx_dir / MANIFEST_NAME
        if not path.is_file():
            raise DraftModelError(f"{onnx_dir} is not an exported draft: no {MANIFEST_NAME} (run specbridge.export first)")
        try:
            fields = json.loads(path.read_text())
            if fields.get("format_version") != MANIFEST_VERSION:
                raise ValueError(f"format_version {fields.get('format_version')!r}, expected {MANIFEST_VERSION}")
            fields["eos_ids"] = tuple(fields["eos_ids"])
            fields["tokenizer_files"] = tuple(fields["tokenizer_files"])
            return cls(**fields)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise DraftModelError(f"corrupt manifest {path}: {_one_line(error)}") from None

    def model_path(self, onnx_dir: Path, variant: Variant) -> Path:
        if variant is Variant.INT8:
            if self.int8_file is None:
                raise DraftModelError(f"{onnx_dir} has no int8 model: export it with int8=True")
            return Path(onnx_dir) / self.int8_file
        return Path(onnx_dir) / self.model_file


class DraftRuntime:
    """A draft LM session plus its KV cache; `feed` extends the cache, `rollback` crops it.

    The cache holds every fed token in every layer, sliding-window layers included (the graph
    masks them), so a rollback is a plain crop and never needs state that was dropped.
    """

    def __init__(self, session: ort.InferenceSession, manifest: DraftManifest) -> None:
        self.manifest = manifest
        self._session = session
        self._past_names = past_names(manifest.num_layers)
        self._output_names = [LOGITS, *present_names(manifest.num_layers)]
        self._empty_cache = [
            np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), dtype=np.float32) for _ in self._past_names
        ]
        self._cache = list(self._empty_cache)

    @classmethod
    def load(cls, onnx_dir: Path, *, variant: Variant | str = Variant.FP32, threads: int | None = None) -> DraftRuntime:
        """Open an exported draft directory; `threads` caps onnxruntime's intra-op pool (None: its default)."""
        onnx_dir = Path(onnx_dir)
        manifest = DraftManifest.read(onnx_dir)
        try:
            variant = Variant(variant)
        except ValueError:
            raise ValueError(f"unknown variant {variant!r}: expected one of {[v.value for v in Variant]}") from None
        model_path = manifest.model_path(onnx_dir, variant)
        if not model_path.is_file():
            raise DraftModelError(f"model file missing: {model_path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Spinning worker threads burn the cores between steps; on an edge device (or beside the
        # verifier on one CPU) they starve everything else for a few microseconds of latency.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped errors for unreadable models
            raise DraftModelError(f"cannot load {model_path}: {_one_line(error)}") from None
        expected = {INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(manifest.num_layers)}
        actual = {graph_input.name for graph_input in session.get_inputs()}
        if actual != expected:
            raise DraftModelError(f"{model_path} does not match its manifest: inputs differ by {sorted(actual ^ expected)[:4]}")
        return cls(session, manifest)

    def fork(self) -> DraftRuntime:
        """Another runtime on the same loaded weights with its own empty KV cache, for a concurrent session.

        The weights are not copied: onnxruntime's `InferenceSession.run` is safe to call from several
        threads at once, and each runtime passes its own cache in and out.
        """
        return DraftRuntime(self._session, self.manifest)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset(self.manifest.eos_ids)

    @property
    def num_cached(self) -> int:
        """Tokens currently held in the KV cache."""
        return self._cache[0].shape[2]

    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` to the context; returns float32 logits `[len(ids), vocab_size]`, row i predicting after ids[i]."""
        new_ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        count = new_ids.shape[1]
        if count == 0:
            raise ValueError("feed needs at least one token id")
        if new_ids.min() < 0 or new_ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {new_ids.min()}..{new_ids.max()}")
        start = self.num_cached
        max_positions = self.manifest.max_positions
        if max_positions is not None and start + count > max_positions:
            raise ContextOverflowError(f"context of {start + count} tokens exceeds the draft's {max_positions} positions")
        feeds = {
            INPUT_IDS: new_ids,
            ATTENTION_MASK: np.ones((1, start + count), dtype=np.int64),
            POSITION_IDS: np.arange(start, start + count, dtype=np.int64).reshape(1, -1),
        }
        feeds.update(zip(self._past_names, self._cache))
        logits, *present = self._session.run(self._output_names, feeds)
        self._cache = present
        return logits[0]

    def rollback(self, keep: int) -> None:
        """Crop the cache to its first `keep` tokens (speculation rejected past them)."""
        if not 0 <= keep <= self.num_cached:
            raise ValueError(f"rollback keep={keep} outside [0, {self.num_cached}]")
        # Views, not copies: the next feed copies them into its fresh present tensors anyway.
        self._cache = [tensor[:, :, :keep, :] for tensor in self._cache]

    def reset(self) -> None:
        self._cache = list(self._empty_cache)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
