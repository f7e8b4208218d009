"""`specbridge bench draft`: prefill time and per-token decode latency of the edge draft runtime.

Runs each exported variant (fp32, int8) on a seeded random prompt with greedy decoding, the way
the drafter drives it, prints a table and writes JSON; numpy and onnxruntime only, like the edge.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_client.draft_runtime import DraftManifest, DraftRuntime, Variant, onnx_bytes

SEED = 0
WARMUP_STEPS = 4


def run_draft_latency(
    onnx_dir: Path,
    *,
    prompt_tokens: int = 64,
    steps: int = 64,
    repeats: int = 5,
    threads: int | None = None,
    variants: Sequence[str] = ("fp32", "int8"),
    json_out: Path | None = None,
) -> dict:
    """Measure every requested variant the export has; variants it lacks are listed as skipped."""
    if prompt_tokens < 1 or steps < 1 or repeats < 1:
        raise ValueError("prompt_tokens, steps and repeats must be >= 1")
    onnx_dir = Path(onnx_dir)
    manifest = DraftManifest.read(onnx_dir)
    if manifest.max_positions is not None and prompt_tokens + steps > manifest.max_positions:
        raise ValueError(f"prompt_tokens + steps exceeds the draft's {manifest.max_positions} positions")
    prompt = np.random.default_rng(SEED).integers(0, manifest.vocab_size, size=prompt_tokens).tolist()

    measured: dict[str, dict] = {}
    skipped: list[str] = []
    for variant in map(Variant, variants):
        if variant is Variant.INT8 and manifest.int8_file is None:
            skipped.append(variant.value)
            continue
        measured[variant.value] = _measure(onnx_dir, variant, prompt, steps, repeats, threads)

    result = {
        "onnx_dir": str(onnx_dir),
        "architecture": manifest.architecture,
        "prompt_tokens": prompt_tokens,
        "steps": steps,
        "repeats": repeats,
        "threads": threads,
        "seed": SEED,
        "onnxruntime": ort.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "variants": measured,
        "skipped_variants": skipped,
    }
    _print_table(result)
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _measure(onnx_dir: Path, variant: Variant, prompt: list[int], steps: int, repeats: int,
             threads: int | None) -> dict:
    load_started = time.perf_counter()
    runtime = DraftRuntime.load(onnx_dir, variant=variant, threads=threads)
    load_s = time.perf_counter() - load_started
    _greedy_run(runtime, prompt, WARMUP_STEPS)
    prefill_ms: list[float] = []
    decode_ms: list[float] = []
    for _ in range(repeats):
        prefill, decode = _greedy_run(runtime, prompt, steps)
        prefill_ms.append(prefill)
        decode_ms.extend(decode)
    return {
        "load_s": load_s,
        "prefill_ms_median": float(np.median(prefill_ms)),
        "decode_ms_median": float(np.median(decode_ms)),
        "decode_ms_p90": float(np.percentile(decode_ms, 90)),
        "decode_tokens_per_s": 1e3 / float(np.median(decode_ms)),
        "model_bytes": onnx_bytes(runtime.manifest.model_path(onnx_dir, variant)),
    }


def _greedy_run(runtime: DraftRuntime, prompt: list[int], steps: int) -> tuple[float, list[float]]:
    """(prefill ms, per-step decode ms) of one prompt plus `steps` greedy tokens from an empty cache."""
    runtime.reset()
    started = time.perf_counter()
    next_id = int(runtime.feed(prompt)[-1].argmax())
    prefill_ms = (time.perf_counter() - started) * 1e3
    decode_ms = []
    for _ in range(steps):
        started = time.perf_counter()
        next_id = int(runtime.feed([next_id])[-1].argmax())
        decode_ms.append((time.perf_counter() - started) * 1e3)
    return prefill_ms, decode_ms


def _print_table(result: dict) -> None:
    threads = result["threads"] if result["threads"] is not None else "default"
    print(f"draft latency: {result['architecture']}  prompt {result['prompt_tokens']} tokens, "
          f"{result['steps']} decode steps x {result['repeats']} repeats, threads {threads}")
    print(f"{'variant':<8} {'MB':>8} {'prefill ms':>11} {'decode ms':>10} {'p90 ms':>8} {'tok/s':>8}")
    for name, row in result["variants"].items():
        print(f"{name:<8} {row['model_bytes'] / 1e6:>8.1f} {row['prefill_ms_median']:>11.2f} "
              f"{row['decode_ms_median']:>10.3f} {row['decode_ms_p90']:>8.3f} {row['decode_tokens_per_s']:>8.1f}")
    for name in result["skipped_variants"]:
        print(f"{name:<8} skipped: not exported (export with int8=True)", file=sys.stderr)
