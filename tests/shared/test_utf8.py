import pytest
from hypothesis import given, strategies as st

from shared.utf8 import incomplete_tail_length, split_complete, starts_on_boundary


@given(st.text(max_size=30), st.integers(min_value=0, max_value=200))
def test_split_complete_cuts_only_at_character_boundaries(text: str, cut: int) -> None:
    data = text.encode("utf-8")
    prefix = data[: min(cut, len(data))]
    complete, rest = split_complete(prefix)
    assert complete + rest == prefix
    complete.decode("utf-8")  # never raises
    assert len(rest) <= 3
    assert data.startswith(complete + rest)


@pytest.mark.parametrize(("data", "tail"), [(b"", 0), (b"abc", 0), ("é".encode()[:1], 1), ("👩".encode()[:3], 3),
                                            ("👩".encode(), 0), (b"a" + "你".encode()[:2], 2)])
def test_incomplete_tail_length(data: bytes, tail: int) -> None:
    assert incomplete_tail_length(data) == tail


def test_starts_on_boundary() -> None:
    assert starts_on_boundary("é".encode())
    assert not starts_on_boundary("é".encode()[1:])
    assert starts_on_boundary(b"")
