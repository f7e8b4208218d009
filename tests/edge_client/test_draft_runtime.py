"""The ONNX draft runtime against its PyTorch source: logits through prefill, decode and rollback."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from edge_client.draft_runtime import (
    MANIFEST_NAME,
    ContextOverflowError,
    DraftManifest,
    DraftModelError,
    DraftRuntime,
)

if TYPE_CHECKING:
    from tests.edge_client.conftest import TinyDraft

PARITY_TOLERANCE = 1e-4


@torch.no_grad()
def reference_logits(draft: TinyDraft, ids: np.ndarray) -> np.ndarray:
    """Logits of one cache-free forward pass over the whole context."""
    return draft.model(input_ids=torch.from_numpy(ids).long().unsqueeze(0)).logits[0].numpy()


def feed_singly(runtime: DraftRuntime, ids: np.ndarray) -> np.ndarray:
    return np.concatenate([runtime.feed([int(token_id)]) for token_id in ids])


def test_logits_match_pytorch_through_decode_and_rollbacks(tiny_draft: TinyDraft) -> None:
    rng = np.random.default_rng(1)
    runtime = DraftRuntime.load(tiny_draft.onnx_dir, threads=1)
    vocab_size = runtime.vocab_size
    first = rng.integers(0, vocab_size, size=32)
    logits = np.concatenate([runtime.feed(first[:12]), feed_singly(runtime, first[12:])])
    worst = np.abs(logits - reference_logits(tiny_draft, first)).max()
    assert runtime.num_cached == 32

    # Rollbacks land both beyond and inside the (tiny Gemma's) sliding window of 8, then feeds resume.
    context = first
    for keep in (20, 5):
        runtime.rollback(keep)
        assert runtime.num_cached == keep
        more = rng.integers(0, vocab_size, size=10)
        logits = np.concatenate([runtime.feed(more[:4]), feed_singly(runtime, more[4:])])
        context = np.concatenate([context[:keep], more])
        worst = max(worst, np.abs(logits - reference_logits(tiny_draft, context)[keep:]).max())

    assert logits.dtype == np.float32 and logits.shape == (10, vocab_size)
    assert worst < PARITY_TOLERANCE, f"{tiny_draft.name}: max abs logit diff {worst:.2e}"


def test_reset_starts_a_fresh_context(gpt2_draft: TinyDraft) -> None:
    runtime = DraftRuntime.load(gpt2_draft.onnx_dir)
    first = runtime.feed([5, 6, 7])
    runtime.feed([8])
    runtime.reset()
    assert runtime.num_cached == 0
    np.testing.assert_array_equal(runtime.feed([5, 6, 7]), first)


def test_forks_share_the_weights_and_run_concurrently_on_their_own_caches(gpt2_draft: TinyDraft) -> None:
    runtime = DraftRuntime.load(gpt2_draft.onnx_dir, threads=1)
    forks = [runtime.fork() for _ in range(4)]
    assert all(fork._session is runtime._session for fork in forks)  # one InferenceSession: weights loaded once
    contexts = [np.random.default_rng(seed).integers(0, runtime.vocab_size, size=24) for seed in range(len(forks))]
    expected = [feed_singly(DraftRuntime.load(gpt2_draft.onnx_dir, threads=1), context) for context in contexts]
    with ThreadPoolExecutor(len(forks)) as pool:
        logits = list(pool.map(feed_singly, forks, contexts))
    for got, want in zip(logits, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert runtime.num_cached == 0 and all(fork.num_cached == 24 for fork in forks)


def test_int8_variant_runs_and_mostly_agrees(tiny_draft: TinyDraft) -> None:
    runtime = DraftRuntime.load(tiny_draft.onnx_dir, variant="int8")
    ids = np.random.default_rng(2).integers(0, runtime.vocab_size, size=24)
    logits = np.concatenate([runtime.feed(ids[:8]), feed_singly(runtime, ids[8:])])
    assert logits.shape == (24, runtime.vocab_size) and np.isfinite(logits).all()
    agreement = np.mean(logits.argmax(-1) == reference_logits(tiny_draft, ids).argmax(-1))
    assert agreement >= 0.75, f"{tiny_draft.name}: int8 argmax agrees on {agreement:.0%} only"


def test_export_writes_manifest_tokenizer_and_report(tiny_draft: TinyDraft) -> None:
    config = tiny_draft.model.config
    manifest = DraftManifest.read(tiny_draft.onnx_dir)
    assert manifest.architecture == type(tiny_draft.model).__name__
    assert manifest.vocab_size == config.vocab_size and manifest.eos_ids == (config.eos_token_id,)
    assert manifest.num_layers == config.num_hidden_layers
    assert all((tiny_draft.onnx_dir / name).is_file() for name in manifest.tokenizer_files)
    report = tiny_draft.report
    assert report.model_path.is_file() and report.model_bytes > report.model_path.stat().st_size
    assert report.int8_path is not None and report.int8_bytes == report.int8_path.stat().st_size
    assert report.max_abs_logit_diff < PARITY_TOLERANCE
    runtime = DraftRuntime.load(tiny_draft.onnx_dir)
    assert runtime.vocab_size == config.vocab_size and runtime.eos_ids == frozenset({config.eos_token_id})


def test_feed_and_rollback_reject_bad_arguments(gpt2_draft: TinyDraft) -> None:
    runtime = DraftRuntime.load(gpt2_draft.onnx_dir)
    runtime.feed([1, 2, 3])
    for keep in (-1, 4):
        with pytest.raises(ValueError, match="rollback"):
            runtime.rollback(keep)
    with pytest.raises(ValueError, match="at least one"):
        runtime.feed([])
    with pytest.raises(ValueError, match="token ids"):
        runtime.feed([runtime.vocab_size])
    with pytest.raises(ContextOverflowError):
        runtime.feed([0] * gpt2_draft.model.config.n_positions)
    assert runtime.num_cached == 3


def copy_without_models(onnx_dir: Path, target: Path) -> Path:
    target.mkdir()
    shutil.copy(onnx_dir / MANIFEST_NAME, target / MANIFEST_NAME)
    return target


def test_load_errors_are_one_line(gpt2_draft: TinyDraft, tmp_path: Path) -> None:
    with pytest.raises(DraftModelError, match="not found"):
        DraftRuntime.load(tmp_path / "missing")
    with pytest.raises(DraftModelError, match="no specbridge_draft.json"):
        DraftRuntime.load(tmp_path)

    no_models = copy_without_models(gpt2_draft.onnx_dir, tmp_path / "no_models")
    with pytest.raises(DraftModelError, match="model file missing"):
        DraftRuntime.load(no_models)
    (no_models / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(DraftModelError, match="cannot load") as caught:
        DraftRuntime.load(no_models)
    assert "\n" not in str(caught.value)

    manifest = json.loads((no_models / MANIFEST_NAME).read_text())
    (no_models / MANIFEST_NAME).write_text(json.dumps({**manifest, "int8_file": None}))
    with pytest.raises(DraftModelError, match="no int8 model"):
        DraftRuntime.load(no_models, variant="int8")
    with pytest.raises(ValueError, match="unknown variant"):
        DraftRuntime.load(no_models, variant="fp16")

    (no_models / MANIFEST_NAME).write_text("{")
    with pytest.raises(DraftModelError, match="corrupt manifest"):
        DraftRuntime.load(no_models)
    del manifest["head_dim"]
    (no_models / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DraftModelError, match="corrupt manifest"):
        DraftRuntime.load(no_models)
