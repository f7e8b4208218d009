"""The packaged production tokenizers: exact round trips on hard text, documented deviations, persistence."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared import tokenizer_zoo
from shared.tokenizer_zoo import (
    TOKENIZER_FAMILIES,
    TokenizerPackageMissingError,
    UnknownTokenizerError,
    load_tokenizer,
)

HARD_TEXTS = [
    "日本語のテキストと中文混合 text, 한국어도",
    "family: 👩\u200d👩\u200d👧 and flags 🇫🇷🇩🇪, skin 👍🏽",
    "cafe\u0301 re\u0301sume\u0301 naïve Å",
    "line one\r\nline two\r\n",
    "\ttabbed\t\tcolumns\t",
    "runs of spaces:      six, then two  here",
    " one leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "digits 1234567890123456789012345 and 3.14159e-10",
    'def add(a, b):\n    """Sum."""\n    return a + b  # ok\n\nprint(add(1, 2))\n',
    "if (x != y && z[0] >= 0x1F) { return `${a}`; } // mixed",
    "\u00a0no-break space, \u200bzero width, \ufeffBOM",
    "\n\n\nblank lines\n",
]
EXPECTED_SIZES = {"gpt2": 50257, "deepseek": 129280, "mistral": 32000}
# What `tokenizer(text)` puts in front of the text's own ids, per family (documented in the module).
EXPECTED_PREFIX = {"gpt2": [], "deepseek": [], "mistral": ["<s>"]}


@pytest.fixture(scope="module", params=TOKENIZER_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer(family: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(family)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_round_trip_is_exact(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    assert decode(tokenizer, encode(tokenizer, text)) == text


def test_vocabulary_size_and_special_tokens(family: str, tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == EXPECTED_SIZES[family]
    assert tokenizer.eos_token_id is not None
    text_ids = encode(tokenizer, "Hello world")
    assert tokenizer("Hello world")["input_ids"] == tokenizer.convert_tokens_to_ids(EXPECTED_PREFIX[family]) + text_ids


def test_special_token_lookalikes_stay_text_when_split(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "literal <s> </s> <unk> <|endoftext|> <｜begin of sentence｜> markers"
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert decode(tokenizer, ids) == text


def test_mistral_parses_special_lookalikes_without_split() -> None:
    # Deviation: the SentencePiece normalizer prepends "▁" to each segment between special tokens,
    # so text around an unsplit "<s>" decodes with one extra space.
    tokenizer = load_tokenizer("mistral")
    ids = encode(tokenizer, "<s> x")
    assert ids[0] == tokenizer.bos_token_id
    assert decode(tokenizer, ids) == "<s>  x"


def test_mistral_reads_the_sentencepiece_space_character_as_a_space() -> None:
    # Deviation shared with raw sentencepiece: U+2581 is its space marker, so a literal one decodes as " ".
    tokenizer = load_tokenizer("mistral")
    assert decode(tokenizer, encode(tokenizer, "a\u2581b")) == "a b"


# A leading space counts as a run too: with the dummy prefix it is "▁▁".
@pytest.mark.parametrize("text", [t for t in HARD_TEXTS if "  " not in t and not t.startswith(" ")])
def test_mistral_ids_equal_raw_sentencepiece_without_space_runs(text: str) -> None:
    import importlib.resources

    import sentencepiece

    with importlib.resources.as_file(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1") as path:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert encode(load_tokenizer("mistral"), text) == processor.encode(text)


def test_mistral_space_runs_differ_from_sentencepiece_in_ids_not_text() -> None:
    # Deviation: sentencepiece splits "▁▁▁▁return" as "▁▁▁" + "▁return"; BPE without that split merges "▁▁▁▁" + "return".
    tokenizer = load_tokenizer("mistral")
    ids = encode(tokenizer, "x\n    return")
    assert tokenizer.convert_ids_to_tokens(ids)[-2:] == ["▁▁▁▁", "return"]
    assert decode(tokenizer, ids) == "x\n    return"


def test_save_and_reload_give_identical_encodings(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tokenizer)
    assert reloaded.all_special_tokens == tokenizer.all_special_tokens
    for text in HARD_TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert decode(reloaded, encode(reloaded, text)) == text


def test_unknown_family_is_one_clean_line() -> None:
    with pytest.raises(UnknownTokenizerError, match="expected one of gpt2, deepseek, mistral") as caught:
        load_tokenizer("bert")
    assert "\n" not in str(caught.value)


def test_missing_package_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerPackageMissingError, match="pip install mistral-common"):
        load_tokenizer("mistral")
