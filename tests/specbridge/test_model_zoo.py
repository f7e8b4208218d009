"""The model zoo: tiny pairs build once, reproducibly, on real tokenizers; failures are one clean line
and leave nothing that looks finished; the real pair (slow) loads and matches its checksum."""

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from edge_client.draft_runtime import DraftManifest
from specbridge import model_zoo
from specbridge.model_zoo import (
    MARKER_NAME,
    PAIR_NAMES,
    ChecksumMismatchError,
    ModelInstallError,
    UnknownPairError,
    build_tiny_pair,
    describe_pairs,
    prepare_pair,
)

TINY_NAMES = [name for name in PAIR_NAMES if name.startswith("tiny-")]


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_pair_reloads_with_ids_matching_its_tokenizers(tiny_pair, name: str) -> None:
    pair = tiny_pair(name)
    tokenizers = {}
    for role, hf_dir in (("draft", pair.draft_hf_dir), ("target", pair.target_hf_dir)):
        model = AutoModelForCausalLM.from_pretrained(hf_dir)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        tokenizers[role] = tokenizer
        assert model.config.num_hidden_layers == 2
        assert model.config.vocab_size == len(tokenizer)
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            assert getattr(model.config, field) == getattr(tokenizer, field), (role, field)
            assert getattr(model.generation_config, field) == getattr(tokenizer, field), (role, field)
    manifest = DraftManifest.read(pair.draft_onnx_dir)
    assert manifest.vocab_size == len(tokenizers["draft"])
    assert manifest.int8_file is None
    same_tokenizer = tokenizers["draft"].get_vocab() == tokenizers["target"].get_vocab()
    assert same_tokenizer == (name == "tiny-same-gpt2")


def test_same_pair_shares_weights(tiny_pair) -> None:
    pair = tiny_pair("tiny-same-gpt2")
    assert pair.draft_hf_dir == pair.target_hf_dir


def test_gemma3_target_has_a_small_sliding_window(tiny_pair) -> None:
    config = AutoModelForCausalLM.from_pretrained(tiny_pair("tiny-mistral-gemma3arch").target_hf_dir).config
    assert config.model_type == "gemma3_text"
    assert config.sliding_window == 8
    assert "sliding_attention" in config.layer_types


def test_second_build_is_a_no_op(tiny_pair) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    marker = pair.target_hf_dir.parent / MARKER_NAME
    before = marker.stat().st_mtime_ns
    started = time.perf_counter()
    assert build_tiny_pair(pair.name, pair.target_hf_dir.parent.parent) == pair
    assert time.perf_counter() - started < 1.0
    assert marker.stat().st_mtime_ns == before


def test_builds_are_reproducible(tiny_pair, tmp_path: Path) -> None:
    first = tiny_pair("tiny-same-gpt2")
    second = build_tiny_pair("tiny-same-gpt2", tmp_path)
    weights, again = (load_file(pair.target_hf_dir / "model.safetensors") for pair in (first, second))
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[key], again[key]) for key in weights)


def test_random_logits_are_peaky(tiny_pair) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    model = AutoModelForCausalLM.from_pretrained(pair.target_hf_dir)
    ids = AutoTokenizer.from_pretrained(pair.target_hf_dir)("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = model(ids).logits.softmax(-1).max(-1).values
    assert top.mean() > 0.2


def test_failed_build_leaves_nothing_that_looks_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_export(*args, **kwargs):
        raise RuntimeError("export interrupted")

    monkeypatch.setattr("specbridge.export.export_draft", broken_export)
    with pytest.raises(RuntimeError, match="export interrupted"):
        build_tiny_pair("tiny-same-gpt2", tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock"]


@pytest.mark.parametrize("prepare", [prepare_pair, build_tiny_pair])
def test_unknown_pair_is_one_clean_line(prepare, tmp_path: Path) -> None:
    with pytest.raises(UnknownPairError) as caught:
        prepare("llama-70b", tmp_path)
    assert "llama-70b" in _one_line(caught)


def _fake_real_pair(monkeypatch: pytest.MonkeyPatch, **changes) -> str:
    fake = dataclasses.replace(model_zoo.SMOLLM2, key="fake-model", **changes)
    monkeypatch.setitem(model_zoo.REAL_PAIRS, "fake-pair", (fake, fake))
    return "fake-pair"


def test_checksum_mismatch_is_one_clean_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def tampered_gguf(model, scratch: Path) -> Path:
        path = scratch / model.gguf_name
        path.write_bytes(b"GGUF but not the real one")
        return path

    name = _fake_real_pair(monkeypatch, materialize=tampered_gguf)
    with pytest.raises(ChecksumMismatchError) as caught:
        prepare_pair(name, tmp_path, progress=False)
    assert "expected b179c9523d0e" in _one_line(caught)
    assert not (tmp_path / "fake-model" / "hf").exists()


def test_failed_install_is_one_clean_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _fake_real_pair(monkeypatch, package="specbridge_no_such_package",
                           pip_args=("--no-index", "specbridge-no-such-package==0.0.1"))
    with pytest.raises(ModelInstallError) as caught:
        prepare_pair(name, tmp_path, progress=False)
    assert "pip install --no-index specbridge-no-such-package==0.0.1" in _one_line(caught)


def test_describe_pairs_lists_every_pair_once() -> None:
    rows = describe_pairs()
    assert [row["name"] for row in rows] == list(PAIR_NAMES)
    assert [row["name"] for row in rows if row["default"]] == [model_zoo.DEFAULT_PAIR]


@pytest.mark.slow
def test_real_pair_loads_and_matches_its_checksum(real_pair) -> None:
    marker = json.loads((real_pair.target_hf_dir / MARKER_NAME).read_text())
    assert marker["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    expected = {real_pair.draft_hf_dir: "LlamaForCausalLM", real_pair.target_hf_dir: "Gemma3ForCausalLM"}
    for hf_dir, architecture in expected.items():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        assert type(model).__name__ == architecture
        assert len(AutoTokenizer.from_pretrained(hf_dir)) == model.config.vocab_size
        del model
    assert DraftManifest.read(real_pair.draft_onnx_dir).num_layers == 30
    assert prepare_pair(progress=False) == real_pair  # prepared: a no-op
