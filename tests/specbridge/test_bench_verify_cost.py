"""The verify-cost benchmark runs end to end on a tiny pair and writes the JSON and the plot (no timing asserted)."""

import json

import pytest

from specbridge.bench.verify_cost import ALL_ROWS, MIXED, VerifyCostBenchConfig, VerifyCostBenchConfigError, run_verify_cost_bench


def test_verify_cost_bench_smoke(tiny_pair, tmp_path, monkeypatch) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    monkeypatch.setenv("SPECBRIDGE_CACHE", str(pair.target_hf_dir.parent.parent))  # where prepare_pair finds it
    config = VerifyCostBenchConfig(pair="tiny-gpt2-mistral", context_tokens=12, proposal_lengths=(0, 3), sessions=(1, 2),
                                   repeats=1, json=str(tmp_path / "verify_cost.json"), plot=str(tmp_path / "verify_cost.png"))
    run_verify_cost_bench(config)
    report = json.loads((tmp_path / "verify_cost.json").read_text())
    shapes = [(row["round"], row["sessions"], row["m"]) for row in report["rounds"]]
    assert shapes == [("steady", 1, 0), ("steady", 1, 3), ("steady", 2, 0), ("steady", 2, 3), ("first", 1, 3)]
    assert set(report["rounds"][1]["lazy_ms"]) == {"0", "1", "3"} and report["rounds"][0][ALL_ROWS + "_ms"] > 0
    assert set(report["rounds"][3]["lazy_ms"]) == {"0", "1", "3", MIXED}  # one of the two sessions rejects x_1
    assert report["rounds"][3]["accepted"][MIXED][0] == 0
    assert all(count <= int(level) for row in report["rounds"] for level, counts in row["accepted"].items() if level != MIXED
               for count in counts)
    assert list(report["head_ms"]) == ["1", "2", "3", "4", "6", "8"]
    assert (tmp_path / "verify_cost.png").stat().st_size > 0


def test_settings_are_validated() -> None:
    with pytest.raises(VerifyCostBenchConfigError, match="--proposal-lengths"):
        VerifyCostBenchConfig(proposal_lengths=(2, -1))
    with pytest.raises(VerifyCostBenchConfigError, match="--sessions"):
        VerifyCostBenchConfig(sessions=())
    with pytest.raises(VerifyCostBenchConfigError, match="--threads"):
        VerifyCostBenchConfig(threads=0)
