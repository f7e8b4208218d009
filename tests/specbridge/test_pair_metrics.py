"""Pair measurements: the coverage count in whole target tokens, and a full report on a tiny pair."""

import pytest

from specbridge.pair_metrics import covered_target_tokens, measure_pair
from specbridge.prompts import HARD_PROMPTS, HELD_OUT_PROMPTS


@pytest.mark.parametrize(("draft", "target", "covered"), [
    (b"hello world", [b"hello", b" world", b"!"], 2),
    (b"hello wor", [b"hello", b" world"], 1),  # a partial target token does not count
    (b"help", [b"hello", b" world"], 0),
    (b"", [b"a"], 0),
    (b"abc", [], 0),
    ("é!".encode(), ["é".encode()[:1], "é".encode()[1:], b"!"], 3),  # byte-fallback pieces count one by one
])
def test_covered_target_tokens(draft: bytes, target: list[bytes], covered: int) -> None:
    assert covered_target_tokens(draft, target) == covered


def test_prompt_sets_are_distinct_and_varied() -> None:
    assert len(HELD_OUT_PROMPTS) >= 20
    assert len(set(HELD_OUT_PROMPTS) | set(HARD_PROMPTS)) == len(HELD_OUT_PROMPTS) + len(HARD_PROMPTS)
    assert sum("def " in prompt or "{" in prompt for prompt in HELD_OUT_PROMPTS) >= 5


def test_same_weights_pair_agrees_far_more_than_a_cross_pair(tiny_pair) -> None:
    prompts = list(HELD_OUT_PROMPTS[:4])
    same = measure_pair(tiny_pair("tiny-same-gpt2"), prompts, draft_len=4, max_new_tokens=16, latency_steps=4)
    cross = measure_pair(tiny_pair("tiny-gpt2-mistral"), prompts, draft_len=4, max_new_tokens=16, latency_steps=4)
    for report in (same, cross):
        assert report["agreement"]["samples"] > 0
        assert report["draft"]["torch_ms_per_token"] > 0 and report["target"]["torch_load_s"] > 0
        assert report["draft"]["onnx"]["fp32"]["ms_per_token"] > 0
    assert same["agreement"]["mean_covered_target_tokens"] >= 3.0
    assert cross["agreement"]["mean_covered_target_tokens"] < same["agreement"]["mean_covered_target_tokens"]
