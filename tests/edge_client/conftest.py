"""Tiny random-weight causal LMs, exported once per session, for the draft runtime tests; and tiny pairs served by
`specbridge serve` in child processes, for the edge's API, CLI and OpenAI-compatible server."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
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

from cloud_verifier.launcher import VerifierProcess
from cloud_verifier.server import ServeConfig
from specbridge.export import ExportReport, export_draft
from specbridge.loading import load_target
from tests.cloud_verifier.conftest import ServedPair

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


SERVED_PAIR = "tiny-gpt2-mistral"  # a byte-level BPE draft under a SentencePiece target
# A chat template in the style of real ones: the target's BOS and EOS as text, which the verifier must tokenize as the
# special tokens they are (and the draft, with another vocabulary, as plain text).
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def with_chat_template(target_dir: Path, out_dir: Path) -> Path:
    """A copy of a model directory whose tokenizer has CHAT_TEMPLATE."""
    shutil.copytree(target_dir, out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return out_dir


def _served(name: str, draft_dir: Path, target_dir: Path) -> Iterator[ServedPair]:
    target, vocab = load_target(target_dir, dtype=torch.float64)
    with VerifierProcess(ServeConfig(target=str(target_dir), port=0, dtype="float64")) as verifier:
        yield ServedPair(name, verifier.address, draft_dir, target_dir, target, vocab)


@pytest.fixture(scope="session")
def chat_served(tiny_pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedPair]:
    """The tiny pair's target, given a chat template, served in float64 (greedy output is exact)."""
    pair = tiny_pair(SERVED_PAIR)
    target_dir = with_chat_template(pair.target_hf_dir, tmp_path_factory.mktemp("chat-target") / "hf")
    yield from _served(SERVED_PAIR + "-chat", Path(pair.draft_onnx_dir), target_dir)


@pytest.fixture(scope="session")
def plain_served(tiny_pair) -> Iterator[ServedPair]:
    """The tiny pair as built: its target has no chat template."""
    pair = tiny_pair(SERVED_PAIR)
    yield from _served(SERVED_PAIR, Path(pair.draft_onnx_dir), Path(pair.target_hf_dir))


@pytest.fixture(scope="session")
def same_served(tiny_pair) -> Iterator[ServedPair]:
    """The control pair: the draft is the target's own weights, so nearly every draft token is accepted."""
    pair = tiny_pair("tiny-same-gpt2")
    yield from _served("tiny-same-gpt2", Path(pair.draft_onnx_dir), Path(pair.target_hf_dir))
