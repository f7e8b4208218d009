"""The load benchmark, run short through the CLI on a tiny pair with overload provoked: only provoked errors, every
other session completes, nothing live once the clients stop; and its classification of errors (no timing asserted)."""

import json

from specbridge.bench.load import CANCELLED, COMPLETED, OVERLOADED, SessionOutcome, memory_warnings, summarize
from specbridge.cli import main

MAX_SESSIONS = 2


def test_load_bench_short_run_with_overload(tiny_pair, tmp_path, monkeypatch, capsys) -> None:
    pair = tiny_pair("tiny-gpt2-mistral")
    monkeypatch.setenv("SPECBRIDGE_CACHE", str(pair.target_hf_dir.parent.parent))  # where prepare_pair finds it
    json_path, plot_path = tmp_path / "load.json", tmp_path / "load.png"
    status = main(["bench", "load", "--pair", "tiny-gpt2-mistral", "--clients", "4", "--duration", "3",
                   "--max-sessions", str(MAX_SESSIONS), "--max-new-tokens", "8", "--cancel-fraction", "0.3",
                   "--sample-interval-s", "0.2", "--json", str(json_path), "--plot", str(plot_path)])
    assert status == 0
    report = json.loads(json_path.read_text())
    summary = report["summary"]
    assert report["overload_provoked"] and report["max_sessions"] == MAX_SESSIONS
    assert summary["unexpected_errors"] == {}
    # 4 clients against 2 sessions are refused at times: the client retries after the verifier's hint, and reports
    # its reconnects; a session refused past its retries ends RESOURCE_EXHAUSTED.
    assert summary["reconnects"] + summary["provoked_errors"].get(OVERLOADED, 0) > 0
    assert summary["completed"] > 0 and summary["cancelled"] > 0
    refused = sum(summary["provoked_errors"].values())
    assert summary["completed"] + summary["cancelled"] + refused == summary["sessions"]
    assert summary["committed_tokens"] > 0
    assert report["after"]["live_sessions"] == 0 and report["after"]["cache_bytes"] == 0
    assert 0 < report["peak"]["live_sessions"] <= MAX_SESSIONS and report["peak"]["cache_bytes"] > 0
    assert report["before"]["rss_bytes"] > 0 and len(report["samples"]) >= 3
    assert plot_path.stat().st_size > 0
    assert "tokens/s" in capsys.readouterr().out


def test_summary_counts_overload_as_provoked_only_when_the_run_asked_for_it() -> None:
    outcomes = [SessionOutcome(COMPLETED, wall_ms=30.0, first_token_ms=5.0, committed_tokens=8, reconnects=2),
                SessionOutcome(COMPLETED, wall_ms=50.0, first_token_ms=7.0, committed_tokens=8),
                SessionOutcome(CANCELLED, wall_ms=6.0), SessionOutcome(OVERLOADED, wall_ms=1.0),
                SessionOutcome("INTERNAL", wall_ms=2.0)]
    overloaded = summarize(outcomes, wall_s=2.0, overload_expected=True)
    assert (overloaded["completed"], overloaded["cancelled"], overloaded["sessions"]) == (2, 1, 5)
    assert overloaded["committed_tokens"] == 16 and overloaded["tokens_per_s"] == 8.0 and overloaded["reconnects"] == 2
    assert overloaded["provoked_errors"] == {OVERLOADED: 1} and overloaded["unexpected_errors"] == {"INTERNAL": 1}
    assert overloaded["session_ms_p50"] == 40.0
    unasked = summarize(outcomes, wall_s=2.0, overload_expected=False)
    assert unasked["provoked_errors"] == {} and unasked["unexpected_errors"] == {OVERLOADED: 1, "INTERNAL": 1}


def test_memory_warnings_name_growth_and_leftover_sessions() -> None:
    before = {"rss_bytes": 100 * 2**20, "cache_bytes": 0, "live_sessions": 0}
    assert memory_warnings(before, {**before, "rss_bytes": 150 * 2**20}, rss_tolerance_mib=64) == []
    grown = memory_warnings(before, {**before, "rss_bytes": 200 * 2**20}, rss_tolerance_mib=64)
    assert len(grown) == 1 and "100.0 MiB" in grown[0]
    leftover = memory_warnings(before, {**before, "live_sessions": 1, "cache_bytes": 4096}, rss_tolerance_mib=64)
    assert len(leftover) == 1 and "1 sessions" in leftover[0]
