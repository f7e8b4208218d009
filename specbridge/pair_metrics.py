"""Characterise a prepared pair: load time, memory and per-token greedy latency of each model, and how
far the draft's greedy text runs along the target's own greedy continuation.

Runs on a workstation after `model_zoo.prepare_pair`; the figures decide whether a pair is worth
speculating with, before the full edge-cloud loop is benchmarked by `specbridge.bench`.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from shared.utf8 import incomplete_tail_length
from shared.vocab import Vocab
from specbridge.model_zoo import PreparedPair

_LATENCY_PROMPT = "def fibonacci(n):\n    "


def measure_pair(pair: PreparedPair, prompts: Sequence[str], *, draft_len: int = 8, max_new_tokens: int = 48,
                 probe_stride: int = 4, latency_steps: int = 32) -> dict:
    """A JSON-ready report; agreement probes every `probe_stride` target tokens of each continuation."""
    draft_vocab, target_vocab = Vocab.from_pretrained(pair.draft_hf_dir), Vocab.from_pretrained(pair.target_hf_dir)
    draft, draft_report = _load_torch(pair.draft_hf_dir)
    target, target_report = _load_torch(pair.target_hf_dir)
    draft_report["torch_ms_per_token"] = _torch_ms_per_token(draft, draft_vocab, latency_steps)
    target_report["torch_ms_per_token"] = _torch_ms_per_token(target, target_vocab, latency_steps)
    draft_report["onnx"] = _onnx_reports(pair.draft_onnx_dir, draft_vocab, latency_steps)

    covered: list[int] = []
    for prompt in prompts:
        continuation = _greedy(target, target_vocab.tokenizer(prompt)["input_ids"], max_new_tokens, target_vocab)
        target_bytes = [target_vocab.token_bytes[token_id] for token_id in continuation]
        # Probe only where the target has enough text left that the draft is never capped by its end.
        for start in range(0, len(continuation) - 2 * draft_len + 1, probe_stride):
            context = prompt.encode() + b"".join(target_bytes[:start])
            if incomplete_tail_length(context):
                continue
            draft_ids = draft_vocab.tokenizer(context.decode())["input_ids"]
            drafted = draft_vocab.decode_bytes(_greedy(draft, draft_ids, draft_len, draft_vocab))
            covered.append(covered_target_tokens(drafted, target_bytes[start:]))
    return {
        "pair": pair.name,
        "draft": draft_report,
        "target": target_report,
        "agreement": {
            "draft_len": draft_len,
            "prompts": len(prompts),
            "samples": len(covered),
            "mean_covered_target_tokens": statistics.fmean(covered) if covered else None,
            "zero_fraction": covered.count(0) / len(covered) if covered else None,
            "histogram": {str(count): covered.count(count) for count in sorted(set(covered))},
        },
    }


def covered_target_tokens(draft_bytes: bytes, target_token_bytes: Sequence[bytes]) -> int:
    """Whole target tokens inside the longest common byte prefix of the draft text and the target's text."""
    common = len(os.path.commonprefix([draft_bytes, b"".join(target_token_bytes)]))
    covered = used = 0
    for token in target_token_bytes:
        used += len(token)
        if used > common:
            break
        covered += 1
    return covered


def _load_torch(hf_dir: Path) -> tuple[PreTrainedModel, dict]:
    rss_before = _rss_bytes()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    return model, {
        "dir": str(hf_dir),
        "architecture": type(model).__name__,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "disk_mb": _dir_bytes(hf_dir) / 2**20,
        "torch_load_s": load_s,
        "torch_rss_delta_mb": (_rss_bytes() - rss_before) / 2**20,
    }


@torch.inference_mode()
def _greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int, vocab: Vocab) -> list[int]:
    """The model's greedy continuation, cut before its first end-of-sequence token."""
    inputs = torch.tensor([prompt_ids])
    output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                            do_sample=False)
    continuation = output[0, inputs.shape[1]:].tolist()
    ends = [index for index, token_id in enumerate(continuation) if token_id in vocab.eos_ids]
    return continuation[: ends[0]] if ends else continuation


@torch.inference_mode()
def _torch_ms_per_token(model: PreTrainedModel, vocab: Vocab, steps: int) -> float:
    """Median wall time of one greedy decode step with a KV cache, after a prefill."""
    out = model(input_ids=torch.tensor([vocab.tokenizer(_LATENCY_PROMPT)["input_ids"]]), use_cache=True)
    step_s = []
    for _ in range(steps):
        next_id = out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        out = model(input_ids=next_id, cache=out.cache, use_cache=True)
        step_s.append(time.perf_counter() - started)
    return 1000 * statistics.median(step_s)


def _onnx_reports(onnx_dir: Path, vocab: Vocab, steps: int) -> dict:
    """Load time, memory and decode latency of each exported variant, through the edge's own runtime."""
    try:
        from edge_client.draft_runtime import DraftManifest, DraftRuntime, Variant, onnx_bytes
    except ImportError as error:
        return {"unavailable": str(error)}
    manifest = DraftManifest.read(onnx_dir)
    reports = {}
    for variant in [Variant.FP32] + ([Variant.INT8] if manifest.int8_file else []):
        gc.collect()
        rss_before = _rss_bytes()
        started = time.perf_counter()
        runtime = DraftRuntime.load(onnx_dir, variant=variant)
        load_s = time.perf_counter() - started
        logits = runtime.feed(vocab.tokenizer(_LATENCY_PROMPT)["input_ids"])
        step_s = []
        for _ in range(steps):
            started = time.perf_counter()
            logits = runtime.feed([int(logits[-1].argmax())])
            step_s.append(time.perf_counter() - started)
        reports[variant.value] = {
            "disk_mb": onnx_bytes(manifest.model_path(onnx_dir, variant)) / 2**20,
            "load_s": load_s,
            "rss_delta_mb": (_rss_bytes() - rss_before) / 2**20,
            "ms_per_token": 1000 * statistics.median(step_s),
        }
        del runtime
    return reports


def _rss_bytes() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _dir_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())
