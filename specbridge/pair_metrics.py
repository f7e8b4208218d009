"""Characterise a prepared pair: load time, memory and per-token greedy latency of each model, and how
far the draft's greedy text runs along the target's own greedy continuation.

Runs on a workstation after `model_zoo.prepare_pair`; the figures decide whether a pair is worth
speculating with, before the full edge-cloud loop is benchmarked by `specbridge.bench`.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from shared.utf8 import incomplete_tail_length
from shared.vocab import Vocab
from specbridge.model_zoo import PreparedPair

_LATENCY_PROMPT = "def fibonacci(n):\n    "


def measure_pair(pair: PreparedPair, prompts: Sequence[str], *, draft_len: int = 8, max_new_tokens: int = 48,
                 probe_stride: int = 4, latency_steps: int = 32) -> dict:
    """A JSON-ready report; agreement probes every `probe_stride` target tokens of each continuation.

    Each model's load time, memory and latency come from a fresh process of its own, so that one
    model's freed pages and warm caches never flatter the next.
    """
    draft_report = _in_fresh_process(_torch_cost, pair.draft_hf_dir, latency_steps)
    target_report = _in_fresh_process(_torch_cost, pair.target_hf_dir, latency_steps)
    draft_report["onnx"] = _onnx_costs(pair.draft_onnx_dir, latency_steps)

    covered = _agreement(pair, prompts, draft_len=draft_len, max_new_tokens=max_new_tokens, probe_stride=probe_stride)
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


def _agreement(pair: PreparedPair, prompts: Sequence[str], *, draft_len: int, max_new_tokens: int,
               probe_stride: int) -> list[int]:
    """Covered target tokens per probe: the draft continues the target's own greedy text so far."""
    draft_vocab, target_vocab = Vocab.from_pretrained(pair.draft_hf_dir), Vocab.from_pretrained(pair.target_hf_dir)
    draft = AutoModelForCausalLM.from_pretrained(pair.draft_hf_dir, dtype=torch.float32).eval()
    target = AutoModelForCausalLM.from_pretrained(pair.target_hf_dir, dtype=torch.float32).eval()
    covered = []
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
    return covered


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


@torch.inference_mode()
def _greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int, vocab: Vocab) -> list[int]:
    """The model's greedy continuation, cut before its first end-of-sequence token."""
    inputs = torch.tensor([prompt_ids])
    output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                            do_sample=False)
    continuation = output[0, inputs.shape[1]:].tolist()
    ends = [index for index, token_id in enumerate(continuation) if token_id in vocab.eos_ids]
    return continuation[: ends[0]] if ends else continuation


def _in_fresh_process(function: Callable[..., dict], *args: object) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


@torch.inference_mode()
def _torch_cost(hf_dir: Path, steps: int) -> dict:
    """Load time, resident memory once the weights are touched, and the median greedy decode step."""
    rss_before = _rss_bytes()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    prompt_ids = AutoTokenizer.from_pretrained(hf_dir)(_LATENCY_PROMPT)["input_ids"]
    started = time.perf_counter()
    out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    first_forward_s = time.perf_counter() - started
    rss_mb = (_rss_bytes() - rss_before) / 2**20  # after one forward: safetensors weights are mapped lazily
    step_s = []
    for _ in range(steps):
        next_id = out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        out = model(input_ids=next_id, cache=out.cache, use_cache=True)
        step_s.append(time.perf_counter() - started)
    return {
        "dir": str(hf_dir),
        "architecture": type(model).__name__,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "disk_mb": _dir_bytes(hf_dir) / 2**20,
        "torch_threads": torch.get_num_threads(),
        "torch_load_s": load_s,
        "torch_first_forward_s": first_forward_s,  # includes paging in the lazily mapped weights
        "torch_rss_mb": rss_mb,
        "torch_ms_per_token": 1000 * statistics.median(step_s),
    }


def _onnx_costs(onnx_dir: Path, steps: int) -> dict:
    """Each exported variant through the edge's own runtime, if this install has it."""
    try:
        from edge_client.draft_runtime import DraftManifest, Variant
    except ImportError as error:
        return {"unavailable": str(error)}
    variants = [Variant.FP32] + ([Variant.INT8] if DraftManifest.read(onnx_dir).int8_file else [])
    return {variant.value: _in_fresh_process(_onnx_cost, onnx_dir, variant.value, steps) for variant in variants}


def _onnx_cost(onnx_dir: Path, variant_name: str, steps: int) -> dict:
    from edge_client.draft_runtime import DraftManifest, DraftRuntime, Variant, onnx_bytes

    variant = Variant(variant_name)

    rss_before = _rss_bytes()
    started = time.perf_counter()
    runtime = DraftRuntime.load(onnx_dir, variant=variant)
    load_s = time.perf_counter() - started
    logits = runtime.feed(AutoTokenizer.from_pretrained(onnx_dir)(_LATENCY_PROMPT)["input_ids"])
    rss_mb = (_rss_bytes() - rss_before) / 2**20
    step_s = []
    for _ in range(steps):
        started = time.perf_counter()
        logits = runtime.feed([int(logits[-1].argmax())])
        step_s.append(time.perf_counter() - started)
    return {
        "disk_mb": onnx_bytes(DraftManifest.read(onnx_dir).model_path(onnx_dir, variant)) / 2**20,
        "load_s": load_s,
        "rss_mb": rss_mb,
        "ms_per_token": 1000 * statistics.median(step_s),
    }


def _rss_bytes() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _dir_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())
