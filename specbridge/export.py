"""Build step: export a Hugging Face causal LM to the ONNX draft (flat KV cache) that the edge runs.

Runs on a workstation with torch and transformers; writes the directory that
`edge_client.draft_runtime.DraftRuntime.load` opens: model, optional int8 model, tokenizer, manifest.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from edge_client.draft_runtime import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    DraftManifest,
    DraftRuntime,
    external_data_path,
    onnx_bytes,
    past_names,
    present_names,
)
from shared.errors import UserFacingError

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# Relative to the largest logit. fp32 ONNX against eager fp32 agrees to ~1e-5 of it (Gemma-3-270M);
# a wrong graph (say, a lost sliding-window mask) is off by the order of the logits themselves.
PARITY_TOLERANCE = 1e-3
# Sample lengths for tracing: neither 0 nor 1, so that torch.export keeps every length symbolic.
_TRACE_PAST_LEN = 5
_TRACE_NEW_LEN = 3


class ExportError(UserFacingError):
    """The model directory cannot be exported as a draft (missing, not a causal LM, or a bad graph)."""


@dataclass(frozen=True)
class ExportReport:
    architecture: str
    out_dir: Path
    model_path: Path
    model_bytes: int  # graph plus its external weight file
    int8_path: Path | None
    int8_bytes: int | None
    manifest_path: Path
    export_seconds: float  # wall time of the whole export, model loading included
    max_abs_logit_diff: float  # exported fp32 graph against PyTorch on a short prefill + decode


@dataclass(frozen=True)
class _CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


class _FlatCacheLM(torch.nn.Module):
    """Exposes the model as (ids, mask, positions, flat past) -> (logits, *flat present) for tracing.

    A cache of plain full layers is rebuilt even for sliding-window models: the model still applies
    its sliding mask, and the edge keeps whole history so that rollback is a crop.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        cache = DynamicCache()
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = [tensor for layer in out.cache.layers for tensor in (layer.keys, layer.values)]
        return (out.logits, *present)


def export_draft(model_dir: Path, out_dir: Path, *, int8: bool = False, progress: bool = True) -> ExportReport:
    """Export the causal LM in `model_dir` (Hugging Face files or one .gguf) to an edge draft in `out_dir`."""
    started = time.perf_counter()
    stage = _stage_printer(progress, started)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    gguf_file = _gguf_file(model_dir)

    stage(f"loading {model_dir}")
    model, tokenizer = _load(model_dir, gguf_file)
    shape = _probe_cache_shape(model)
    _untie_output_embeddings(model)
    out_dir.mkdir(parents=True, exist_ok=True)

    stage(f"tracing {type(model).__name__} ({shape.num_layers} layers) to ONNX")
    model_path = out_dir / MODEL_FILE
    _export_onnx(model, shape, model_path)

    int8_path = out_dir / INT8_FILE
    if int8:
        stage("quantizing weights to int8")
        # A protobuf holds at most 2 GiB; past that fp32 size the int8 graph may not fit in one file either.
        large = onnx_bytes(model_path) >= 2**31
        quantize_dynamic(model_path, int8_path, weight_type=QuantType.QInt8, use_external_data_format=large)
    else:
        for stale in (int8_path, external_data_path(int8_path)):
            stale.unlink(missing_ok=True)

    stage("writing tokenizer and manifest")
    tokenizer_files = tuple(sorted({Path(saved).name for saved in tokenizer.save_pretrained(out_dir)}))
    manifest = DraftManifest(
        architecture=type(model).__name__,
        model_type=model.config.model_type,
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab_size,
        eos_ids=_eos_ids(model, tokenizer, shape.vocab_size),
        max_positions=getattr(model.config, "max_position_embeddings", None),
        dtype="float32",
        model_file=MODEL_FILE,
        int8_file=INT8_FILE if int8 else None,
        tokenizer_files=tokenizer_files,
    )
    manifest_path = manifest.write(out_dir)

    stage("checking the ONNX logits against PyTorch")
    diff, scale = _parity_diff(model, DraftRuntime.load(out_dir), shape.vocab_size)
    if not diff <= PARITY_TOLERANCE * scale:
        manifest_path.unlink()
        raise ExportError(f"exported graph disagrees with PyTorch by {diff:.3g} (logits up to {scale:.3g}); export withdrawn")

    elapsed = time.perf_counter() - started
    stage(f"done: {out_dir} (max abs logit diff {diff:.2g})")
    return ExportReport(
        architecture=manifest.architecture,
        out_dir=out_dir,
        model_path=model_path,
        model_bytes=onnx_bytes(model_path),
        int8_path=int8_path if int8 else None,
        int8_bytes=onnx_bytes(int8_path) if int8 else None,
        manifest_path=manifest_path,
        export_seconds=elapsed,
        max_abs_logit_diff=diff,
    )


def _stage_printer(enabled: bool, started: float) -> Callable[[str], None]:
    def stage(message: str) -> None:
        if enabled:
            print(f"[export {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return stage


def _gguf_file(model_dir: Path) -> str | None:
    """The one .gguf to load when the directory has no config.json; raises if it is not a model directory."""
    if not model_dir.exists():
        raise ExportError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise ExportError(f"not a directory: {model_dir}")
    if (model_dir / "config.json").is_file():
        return None
    ggufs = sorted(path.name for path in model_dir.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ExportError(f"{model_dir} holds several .gguf files ({', '.join(ggufs)}): keep one")
    raise ExportError(f"{model_dir} is not a model directory: no config.json and no .gguf file")


def _load(model_dir: Path, gguf_file: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(model_dir, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(f"cannot read the model config in {model_dir}: {_one_line(error)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    except ValueError as error:
        raise ExportError(f"{model_dir} ({config.model_type}) is not a causal LM: {_one_line(error)}") from None
    except OSError as error:
        raise ExportError(f"cannot load the weights in {model_dir}: {_one_line(error)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    except (OSError, ValueError, TypeError) as error:
        raise ExportError(f"no usable tokenizer in {model_dir}: {_one_line(error)}") from None
    return model.eval(), tokenizer


@torch.no_grad()
def _probe_cache_shape(model: PreTrainedModel) -> _CacheShape:
    """Read the cache layout from one real forward pass rather than trusting config field names."""
    out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), cache=DynamicCache(), use_cache=True)
    shapes = {tuple(layer.keys.shape) for layer in out.cache.layers}
    shapes |= {tuple(layer.values.shape) for layer in out.cache.layers}
    if len(shapes) != 1:
        raise ExportError(f"{type(model).__name__} has per-layer cache shapes {sorted(shapes)}: not supported")
    _, num_kv_heads, _, head_dim = shapes.pop()
    return _CacheShape(len(out.cache.layers), num_kv_heads, head_dim, out.logits.shape[-1])


def _untie_output_embeddings(model: PreTrainedModel) -> None:
    """Give a tied output head its own weight copy before tracing.

    Tied, it reaches ONNX as MatMul(x, Transpose(embedding)): onnxruntime folds that for fp32, but
    after int8 quantization it dequantizes the whole vocabulary matrix on every step (slower than fp32).
    Untied, the exporter stores the transposed weight, which quantizes to a plain MatMulInteger.
    """
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        output.weight = torch.nn.Parameter(output.weight.detach().clone())


@torch.no_grad()
def _export_onnx(model: PreTrainedModel, shape: _CacheShape, model_path: Path) -> None:
    past = [
        torch.zeros(1, shape.num_kv_heads, _TRACE_PAST_LEN, shape.head_dim)
        for _ in range(2 * shape.num_layers)
    ]
    total = _TRACE_PAST_LEN + _TRACE_NEW_LEN
    sample = (
        torch.zeros(1, _TRACE_NEW_LEN, dtype=torch.long),
        torch.ones(1, total, dtype=torch.long),
        torch.arange(_TRACE_PAST_LEN, total).unsqueeze(0),
        past,
    )
    dynamic = torch.export.Dim.DYNAMIC
    dynamic_shapes = ({1: dynamic}, {1: dynamic}, {1: dynamic}, [{2: dynamic} for _ in past])
    torch.onnx.export(
        _FlatCacheLM(model).eval(),
        sample,
        str(model_path),
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(shape.num_layers)],
        output_names=[LOGITS, *present_names(shape.num_layers)],
        external_data=True,
        verbose=False,
    )


@torch.no_grad()
def _parity_diff(model: PreTrainedModel, runtime: DraftRuntime, vocab_size: int) -> tuple[float, float]:
    """(max abs logit difference, max abs logit) over a 6-token prefill and 2 decode steps vs one full forward."""
    ids = np.random.default_rng(0).integers(0, vocab_size, size=8)
    onnx_logits = np.concatenate([runtime.feed(ids[:6]), runtime.feed(ids[6:7]), runtime.feed(ids[7:])])
    torch_logits = model(input_ids=torch.from_numpy(ids).unsqueeze(0)).logits[0].numpy()
    return float(np.abs(onnx_logits - torch_logits).max()), max(1.0, float(np.abs(torch_logits).max()))


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[int, ...]:
    """Every end-of-sequence id the config, generation config or tokenizer declares, within the logits."""
    declared: set[int] = set()
    for value in (
        model.config.eos_token_id,
        getattr(model.generation_config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            declared.add(value)
        elif value is not None:
            declared.update(value)
    return tuple(sorted(token_id for token_id in declared if 0 <= token_id < vocab_size))


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
