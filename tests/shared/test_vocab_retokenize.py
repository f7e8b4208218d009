"""Re-tokenization across the real tokenizer families: bytes are exact, seams canonical where possible."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from shared.retokenize import retokenize
from shared.tokenizer_zoo import TOKENIZER_FAMILIES, load_tokenizer
from shared.vocab import TokenFamily, Vocab

HARD_TEXTS = [
    "def add(a, b):\n    return a + b  # sum\n",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文混合 text",
    "family: 👩\u200d👩\u200d👧 and flags 🇫🇷🇩🇪",
    "cafe\u0301 naïve résumé",
    "line one\r\nline two\r\n\ttabbed\t\tmore",
    "spaces:     five, then 1234567890123456789 digits",
    "literal <bos> and <s> and </s> and <|endoftext|> markers",
]


@pytest.fixture(scope="module", params=TOKENIZER_FAMILIES)
def vocab(request: pytest.FixtureRequest) -> Vocab:
    return Vocab.from_tokenizer(load_tokenizer(request.param))


def test_family_detected(vocab: Vocab) -> None:
    assert vocab.family in (TokenFamily.BYTE_LEVEL_BPE, TokenFamily.SENTENCEPIECE)
    assert vocab.size == len(vocab.tokenizer)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_byte_table_matches_encoding(vocab: Vocab, text: str) -> None:
    ids = vocab.encode(text)
    decoded = vocab.decode_bytes(ids)
    # SentencePiece with a dummy prefix may add one leading space; the rest is exact.
    assert decoded in (text.encode(), b" " + text.encode())


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_retokenize_every_cut_is_byte_exact(vocab: Vocab, text: str) -> None:
    ids = vocab.encode(text)
    for cut in range(1, len(ids)):
        rest = vocab.decode_bytes(ids[cut:])
        new_ids = retokenize(vocab, ids[:cut], rest)
        assert vocab.decode_bytes(new_ids) == rest
        assert not set(new_ids) & vocab.special_ids


def test_retokenize_is_canonical_at_word_boundaries(vocab: Vocab) -> None:
    committed = vocab.encode("The quick brown")
    new = " fox jumps over the lazy dog"
    expected = vocab.encode("The quick brown" + new)
    assert committed == expected[: len(committed)]
    assert retokenize(vocab, committed, new.encode()) == expected[len(committed) :]


def test_literal_special_token_text_stays_text(vocab: Vocab) -> None:
    committed = vocab.encode("Hello")
    for special in filter(None, (vocab.tokenizer.bos_token, vocab.tokenizer.eos_token)):
        new_ids = retokenize(vocab, committed, f" {special} x".encode())
        assert not set(new_ids) & vocab.special_ids
        assert vocab.decode_bytes(new_ids) == f" {special} x".encode()


def test_bytes_cut_inside_a_character(vocab: Vocab) -> None:
    committed = vocab.encode("emoji")
    data = " 👩\u200d👩".encode()
    for cut in range(1, len(data)):
        assert vocab.decode_bytes(retokenize(vocab, committed, data[:cut])) == data[:cut]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.text(min_size=1, max_size=12), suffix=st.text(min_size=1, max_size=12))
def test_retokenize_property(vocab: Vocab, prefix: str, suffix: str) -> None:
    committed = vocab.encode(prefix)
    if not committed:
        return
    new_ids = retokenize(vocab, committed, suffix.encode())
    assert vocab.decode_bytes(new_ids) == suffix.encode()
    assert all(0 <= i < vocab.size for i in new_ids)
