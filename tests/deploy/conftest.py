"""Scale-out as deployed: two `specbridge serve` replicas of the tiny target (child processes, float64 for exact
equality) behind Debian's nginx running the shipped deploy/nginx config.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cloud_verifier.launcher import VerifierProcess
from cloud_verifier.server import ServeConfig
from cloud_verifier.target import TargetModel
from shared.vocab import Vocab
from specbridge.loading import load_target
from tests.cloud_verifier.conftest import ServedPair, edge_drafts  # noqa: F401 (a fixture, shared)
from tests.deploy.nginx_balancer import NginxBalancer, nginx_binary

PAIR = "tiny-gpt2-mistral"
REPLICAS = 2


@dataclass
class ScaledOut:
    pair: ServedPair  # its address is nginx's
    replicas: list[VerifierProcess]
    nginx: NginxBalancer


@contextmanager
def _scaled_out(prefix: Path, tiny_pair, reference_target: tuple[TargetModel, Vocab]) -> Iterator[ScaledOut]:
    nginx_binary()  # fails (CI) or skips (elsewhere) before any replica starts
    pair = tiny_pair(PAIR)
    target, vocab = reference_target
    config = ServeConfig(target=str(pair.target_hf_dir), port=0, dtype="float64", threads=1)
    replicas = [VerifierProcess(config) for _ in range(REPLICAS)]
    with ExitStack() as stack:
        for replica in replicas:
            stack.callback(replica.stop)  # a no-op for one that never started
        with ThreadPoolExecutor(REPLICAS) as pool:  # each waits seconds for its child to load the model
            list(pool.map(VerifierProcess.__enter__, replicas))
        nginx = stack.enter_context(NginxBalancer(prefix, [replica.address for replica in replicas]))
        yield ScaledOut(ServedPair(PAIR, nginx.address, Path(pair.draft_onnx_dir), Path(pair.target_hf_dir), target, vocab),
                        replicas, nginx)


@pytest.fixture(scope="module")
def reference_target(tiny_pair) -> tuple[TargetModel, Vocab]:
    """The served target's weights in this process, for reference generate()."""
    return load_target(tiny_pair(PAIR).target_hf_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def scaled_out(tmp_path_factory: pytest.TempPathFactory, tiny_pair, reference_target) -> Iterator[ScaledOut]:
    """Shared by the tests of a module: compare stats before and after, never absolute counts."""
    with _scaled_out(tmp_path_factory.mktemp("nginx"), tiny_pair, reference_target) as deployment:
        yield deployment


@pytest.fixture
def scaled_out_to_break(tmp_path: Path, tiny_pair, reference_target) -> Iterator[ScaledOut]:
    """A deployment of the test's own, for a test that kills a replica."""
    with _scaled_out(tmp_path / "nginx", tiny_pair, reference_target) as deployment:
        yield deployment
