"""Session fixtures shared across test packages: tiny model pairs (built once) and the real pair."""

from collections.abc import Callable

import pytest

from specbridge.model_zoo import PreparedPair, build_tiny_pair, prepare_pair


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], PreparedPair]:
    """`tiny_pair("tiny-gpt2-mistral")`: that pair, built into this session's temp dir on first use."""
    root = tmp_path_factory.mktemp("tiny-pairs")
    return lambda name: build_tiny_pair(name, root)


@pytest.fixture(scope="session")
def real_pair() -> PreparedPair:
    """The default real pair, prepared once into the user's model cache (minutes the first time)."""
    return prepare_pair(progress=False)
