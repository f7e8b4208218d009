"""The latency benchmark end to end on a tiny pair (every mode through a real delay proxy), and its cost model.

No timing is asserted: the smoke run checks the report's shape, that every speculative mode's output
is token-identical to cloud-only, and that the plot is drawn from the JSON.
"""

import json

import pytest

from specbridge.bench.latency import LatencyBenchConfig, LatencyBenchConfigError, Mode, run_latency_bench
from specbridge.bench.latency_report import cost_model
from specbridge.placement import PlacementError

REQUIRED_KEYS = {"profile", "rtt_ms", "mode", "ttft_ms_p50", "total_ms_p50", "tokens_per_s", "mean_accepted_length",
                 "forwards_per_token", "uplink_bytes_per_round", "downlink_bytes_per_round", "ratio_vs_cloud_only"}


def test_latency_bench_smoke(tiny_pair, tmp_path, monkeypatch) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    monkeypatch.setenv("SPECBRIDGE_CACHE", str(pair.target_hf_dir.parent.parent))  # where prepare_pair finds it
    config = LatencyBenchConfig(pair="tiny-gpt2-mistral", profiles="lan,wifi", prompts=2, repeats=1, max_new_tokens=8,
                                draft_len=3, json=str(tmp_path / "latency.json"), plot=str(tmp_path / "latency.png"))
    run_latency_bench(config)
    report = json.loads((tmp_path / "latency.json").read_text())
    assert "verifier on CPU 0" in report["placement"] and "edge on CPU 1" in report["placement"]
    assert report["interference"]["verifier_ms_per_token_alone"] > 0 and report["interference"]["slowdown"] > 0
    rows = {(row["profile"], row["mode"]): row for row in report["summary"]}
    assert set(rows) == {(profile, mode.value) for profile in ("lan", "wifi") for mode in Mode}
    for (profile, mode), row in rows.items():
        assert REQUIRED_KEYS <= row.keys()
        assert row["rtt_ms"] == {"lan": 1.0, "wifi": 15.0}[profile]
        if mode not in (Mode.CLOUD_ONLY, Mode.EDGE_ONLY):
            assert row["identical_to_cloud_only"] == 1.0, (profile, mode)
            assert row["uplink_bytes_per_round"] > 0 and row["forwards_per_token"] <= 1.0
            assert row["model_ms_per_token"] > 0
    assert rows[("wifi", "cloud_only")]["ratio_vs_cloud_only"] == 1.0
    uplink = {row["rule"]: row["uplink_bytes_per_round"] for row in report["uplink_by_rule"]}
    assert set(uplink) == {"greedy", "point_mass", "draft_probs", "dtw_transfer_approx"}
    # Greedy and point-mass send text only; the rules that read the draft's law send its top-k too.
    assert max(uplink["greedy"], uplink["point_mass"]) < min(uplink["draft_probs"], uplink["dtw_transfer_approx"])
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_cost_model_hides_drafting_only_on_surviving_rounds() -> None:
    # RTT 10 + verify 50 in flight, 4 tokens x 20 ms drafting, 2 tokens per round.
    assert cost_model("speculative", 10.0, 50.0, 4, 20.0, 0.0, 2.0) == pytest.approx((60 + 80) / 2)
    assert cost_model("speculative_ahead", 10.0, 50.0, 4, 20.0, 1.0, 2.0) == pytest.approx(80 / 2)
    assert cost_model("speculative_ahead", 10.0, 50.0, 4, 20.0, 0.5, 2.0) == pytest.approx((0.5 * 80 + 0.5 * 140) / 2)


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"profiles": "moon"}, LatencyBenchConfigError, "--profiles must name"),
    ({"modes": "fastest"}, LatencyBenchConfigError, "--modes must name"),
    ({"prompts": 0}, LatencyBenchConfigError, "--prompts must be >= 1"),
    ({"verifier_cpus": (0,), "edge_cpus": (0,)}, PlacementError, "must not share CPUs"),
])
def test_bad_settings_are_one_line_errors(overrides: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        LatencyBenchConfig(**overrides)
