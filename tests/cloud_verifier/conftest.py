"""Served tiny pairs for the verifier's batching and gRPC tests: a target in-process (for reference
generate()), and the same target served by `specbridge serve` in a child process.

Both run in float64: in float32 a row's logits depend on the batch around it by ~1e-6 (BLAS picks
kernels by shape), enough to flip a near-tie now and then, and exact equality is the claim tested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from cloud_verifier.launcher import VerifierProcess
from cloud_verifier.server import ServeConfig
from cloud_verifier.target import TargetModel
from edge_client.client import EdgeDraft, load_edge_draft
from shared.vocab import Vocab
from specbridge.loading import load_target

# Two tokenizer families on each side: a SentencePiece target under a byte-level BPE draft, then a
# byte-level BPE target under a draft with a 129k vocabulary (slow to load and draft: the slow run).
SERVED_PAIRS = ["tiny-gpt2-mistral", pytest.param("tiny-deepseek-gpt2", marks=pytest.mark.slow)]
MAX_SESSIONS = 24


@dataclass
class ServedPair:
    name: str
    address: str
    draft_onnx_dir: Path
    target_hf_dir: Path
    target: TargetModel  # the same weights in this process, for reference generate()
    vocab: Vocab
    _references: dict[tuple[tuple[int, ...], int], list[int]] = field(default_factory=dict)

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.vocab.tokenizer(prompt)["input_ids"])

    def reference(self, prompt: str, max_new_tokens: int) -> list[int]:
        """The target's own greedy continuation, as Hugging Face generate() produces it."""
        return self.reference_for_ids(self.prompt_ids(prompt), max_new_tokens)

    def reference_for_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in self._references:
            inputs = torch.tensor([prompt_ids])
            with torch.inference_mode():
                output = self.target.model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                                    max_new_tokens=max_new_tokens, do_sample=False)
            self._references[key] = output[0, inputs.shape[1]:].tolist()
        return self._references[key]


@pytest.fixture(scope="module")
def tiny_target(tiny_pair) -> tuple[TargetModel, Vocab]:
    return load_target(tiny_pair("tiny-gpt2-mistral").target_hf_dir, dtype=torch.float64)


@pytest.fixture(scope="module", params=SERVED_PAIRS)
def served_pair(request: pytest.FixtureRequest, tiny_pair) -> Iterator[ServedPair]:
    pair = tiny_pair(request.param)
    target, vocab = load_target(pair.target_hf_dir, dtype=torch.float64)
    config = ServeConfig(target=str(pair.target_hf_dir), port=0, dtype="float64", max_sessions=MAX_SESSIONS)
    verifier = VerifierProcess(config)
    with verifier:
        yield ServedPair(request.param, verifier.address, Path(pair.draft_onnx_dir), Path(pair.target_hf_dir), target, vocab)
    assert verifier.stop() == 0, "the verifier did not shut down cleanly on SIGTERM"


@pytest.fixture(scope="session")
def edge_drafts() -> Callable[[ServedPair, int], list[EdgeDraft]]:
    """`edge_drafts(pair, n)`: n independent edge drafts (each edge session owns its KV cache), loaded once per run."""
    loaded: dict[Path, list[EdgeDraft]] = {}

    def drafts(pair: ServedPair, count: int) -> list[EdgeDraft]:
        pool = loaded.setdefault(pair.draft_onnx_dir, [load_edge_draft(pair.draft_onnx_dir, threads=1)])
        while len(pool) < count:
            pool.append(pool[0].fork())
        return pool[:count]

    return drafts
