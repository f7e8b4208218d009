"""The HTTP-overhead benchmark runs end to end on a tiny pair and writes its JSON (no timing asserted)."""

import json

from specbridge.bench.http_overhead import MODES, HttpOverheadBenchConfig, Timing, run_http_overhead_bench, summarize


def test_http_overhead_bench_smoke(tiny_pair, tmp_path, monkeypatch) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    monkeypatch.setenv("SPECBRIDGE_CACHE", str(pair.target_hf_dir.parent.parent))  # where prepare_pair finds it
    config = HttpOverheadBenchConfig(pair="tiny-gpt2-mistral", prompts=2, max_new_tokens=6, draft_len=3, repeats=2,
                                     json=str(tmp_path / "http_overhead.json"))
    run_http_overhead_bench(config)
    report = json.loads((tmp_path / "http_overhead.json").read_text())
    assert len(report["per_prompt"]) == 2 and report["median_over_prompts"]["identical_text"] is True
    for row in report["per_prompt"]:
        assert all(row[f"{mode}_wall_ms_p50"] > 0 for mode in MODES)
    assert "http_overhead_ms" in report["median_over_prompts"]


def test_overhead_is_the_difference_of_medians() -> None:
    timings = {"p": {"bare_api": [Timing(10, 2, "x"), Timing(30, 4, "x"), Timing(20, 3, "x")],
                     "http": [Timing(25, 25, "x")] * 3, "http_stream": [Timing(22, 5, "x")] * 3}}
    row = summarize(timings)["per_prompt"][0]
    assert (row["http_overhead_ms"], row["http_stream_overhead_ms"], row["http_stream_first_text_overhead_ms"]) == (5, 2, 2)
    assert row["identical_text"]
