"""The draft latency benchmark runs end to end on a tiny export and writes its JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from specbridge.bench.draft_latency import run_draft_latency
from specbridge.model_zoo import PreparedPair


def test_draft_latency_measures_fp32_and_skips_a_missing_int8(
    tiny_pair: Callable[[str], PreparedPair], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_dir = tiny_pair("tiny-same-gpt2").draft_onnx_dir
    json_out = tmp_path / "bench" / "draft.json"
    result = run_draft_latency(onnx_dir, prompt_tokens=8, steps=4, repeats=2, threads=1, json_out=json_out)
    fp32 = result["variants"]["fp32"]
    assert 0 < fp32["decode_ms_median"] <= fp32["decode_ms_p90"]
    assert fp32["prefill_ms_median"] > 0 and fp32["model_bytes"] > 0
    assert result["skipped_variants"] == ["int8"]
    assert json.loads(json_out.read_text()) == result
    assert "fp32" in capsys.readouterr().out
