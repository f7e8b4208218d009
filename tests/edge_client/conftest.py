"""Tiny random-weight causal LMs, exported once per session, for the draft runtime tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from specbridge.export import ExportReport, export_draft

VOCAB_SIZE = 1000
EOS_ID = 1
SLIDING_WINDOW = 8  # small, so the parity sequences cross it

TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "gpt2": lambda: GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB_SIZE, bos_token_id=EOS_ID, eos_token_id=EOS_ID
    ),
    "llama": lambda: LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        bos_token_id=2,
        eos_token_id=EOS_ID,
    ),
    "gemma3": lambda: Gemma3TextConfig(
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB_SIZE,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=EOS_ID,
    ),
}


@dataclass(frozen=True)
class TinyDraft:
    name: str
    model: PreTrainedModel  # the PyTorch reference, same weights as the export
    onnx_dir: Path
    report: ExportReport


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": EOS_ID, **{f"w{index}": index for index in range(2, 100)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")


def build_tiny_model_dir(name: str, model_dir: Path) -> PreTrainedModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]()).eval()
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return model


@pytest.fixture(scope="session")
def draft_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyDraft]:
    """Builds and exports (fp32 and int8) each tiny architecture at most once per session."""
    built: dict[str, TinyDraft] = {}

    def build(name: str) -> TinyDraft:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            model = build_tiny_model_dir(name, root / "hf")
            report = export_draft(root / "hf", root / "onnx", int8=True, progress=False)
            built[name] = TinyDraft(name, model, root / "onnx", report)
        return built[name]

    return build


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_draft(request: pytest.FixtureRequest, draft_factory: Callable[[str], TinyDraft]) -> TinyDraft:
    return draft_factory(request.param)


@pytest.fixture(scope="session")
def gpt2_draft(draft_factory: Callable[[str], TinyDraft]) -> TinyDraft:
    return draft_factory("gpt2")
