"""The throughput benchmark runs end to end on a tiny pair and writes the JSON and the plot (no timing asserted)."""

import json

from edge_client.client import ClientResult
from shared.wire import FinishReason
from specbridge.bench.throughput import SPECULATIVE, TARGET_ONLY, ThroughputBenchConfig, inter_token_ms, run_throughput_bench

ROW_KEYS = {"clients", "tokens_per_s", "itl_ms_p50", "itl_ms_p90", "forwards_per_token", "rows_per_forward"}


def test_throughput_bench_smoke(tiny_pair, tmp_path, monkeypatch) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    monkeypatch.setenv("SPECBRIDGE_CACHE", str(pair.target_hf_dir.parent.parent))  # where prepare_pair finds it
    config = ThroughputBenchConfig(pair="tiny-gpt2-mistral", clients=(1, 2), prompts=3, max_new_tokens=6, draft_len=3,
                                   json=str(tmp_path / "throughput.json"), plot=str(tmp_path / "throughput.png"))
    run_throughput_bench(config)
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert set(report["results"]) == {SPECULATIVE, TARGET_ONLY}
    for mode in (SPECULATIVE, TARGET_ONLY):
        assert set(report["results"][mode]) == {"1", "2"}
        for count, row in report["results"][mode].items():
            assert ROW_KEYS <= row.keys() and row["clients"] == int(count)
            assert row["tokens_per_s"] > 0 and row["forwards_per_token"] > 0
    assert "verifier on CPU 0" in report["note"] and "edge on CPU 1" in report["note"]
    assert all(row["verifier_busy_ms_per_token"] > 0 for rows in report["results"].values() for row in rows.values())
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_inter_token_latency_spreads_each_gap_over_its_tokens() -> None:
    result = ClientResult(output_bytes=b"", target_token_ids=(1,) * 6, prompt_token_count=1, finish_reason=FinishReason.LENGTH,
                          wall_ms=40.0, arrival_ms=(10.0, 16.0, 40.0), committed_per_response=(1, 2, 3))
    assert inter_token_ms(result) == [3.0, 3.0, 8.0, 8.0, 8.0]  # the first response is time to first token
