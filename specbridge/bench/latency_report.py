"""The latency benchmark's report: per-profile summaries with the per-round cost model, tables, plots.

Pure functions of the runs `specbridge.bench.latency` recorded (plots read the JSON-ready report),
so a saved JSON can be re-tabled or re-plotted without measuring again.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

AHEAD_MODES = ("speculative_ahead", "ahead_fixed")
SPECULATIVE_MODES = ("speculative", "adaptive", *AHEAD_MODES)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _rounds(runs: list[dict], key: str) -> list[float]:
    return [value for run in runs for value in run.get(key, [])]


def _draft_step_ms(profile_runs: list[dict]) -> float | None:
    """Edge time per draft token, from rounds that drafted every token fresh (no survivor from the round before)."""
    steps = []
    for run in profile_runs:
        if run["mode"] not in SPECULATIVE_MODES:
            continue
        survived_before = [0] + run["ahead_survived_per_round"][:-1]
        steps += [ms / k for ms, k, carried in zip(run["draft_ms_per_round"], run["draft_len_per_round"], survived_before)
                  if k and not carried]
    return _median(steps)


def cost_model(mode: str, network_ms: float, verify_ms: float, draft_len: float, draft_step_ms: float,
               survival_share: float, committed_per_round: float) -> float:
    """Predicted ms per committed token: round = RTT + verify + k x draft without draft-ahead; with it, a round
    whose ahead draft survives costs max(RTT + verify, k x draft); over accepted + 1 tokens per round."""
    in_flight, drafting = network_ms + verify_ms, draft_len * draft_step_ms
    if mode in AHEAD_MODES:
        round_ms = survival_share * max(in_flight, drafting) + (1 - survival_share) * (in_flight + drafting)
    else:
        round_ms = in_flight + drafting
    return round_ms / committed_per_round


def _summary_row(profile: str, mode: str, runs: list[dict], cloud: dict[tuple, dict], draft_step_ms: float | None) -> dict:
    tokens = sum(run["tokens"] for run in runs)
    rounds = sum(run["rounds"] for run in runs)
    totals = [run["total_ms"] for run in runs]
    paired = [(run, cloud.get((run["prompt_index"], run["repeat"]))) for run in runs]
    paired = [(run, base) for run, base in paired if base is not None]
    row = {
        "profile": profile, "rtt_ms": runs[0]["rtt_ms"], "mode": mode, "runs": len(runs),
        "ttft_ms_p50": _median([run["ttft_ms"] for run in runs]),
        "total_ms_p50": _median(totals), "total_ms_p10": _percentile(totals, 10), "total_ms_p90": _percentile(totals, 90),
        "tokens_per_s": _median([run["tokens"] / run["total_ms"] * 1e3 for run in runs]),
        "ms_per_token_p50": _median([run["total_ms"] / run["tokens"] for run in runs]),
        "ratio_vs_cloud_only": _median([run["total_ms"] / base["total_ms"] for run, base in paired]),
        "mean_accepted_length": None, "forwards_per_token": None, "uplink_bytes_per_round": None,
        "downlink_bytes_per_round": None, "verifier_busy_ms_per_token": None, "identical_to_cloud_only": None,
        "ahead_survival_rate": None, "draft_len_mean": None, "model_ms_per_token": None,
    }
    if mode == "edge_only":
        return row
    row.update(forwards_per_token=sum(run["forwards"] for run in runs) / tokens,
               uplink_bytes_per_round=sum(run["uplink_bytes"] for run in runs) / rounds,
               downlink_bytes_per_round=sum(run["downlink_bytes"] for run in runs) / rounds,
               verifier_busy_ms_per_token=sum(run["busy_ms"] for run in runs) / tokens,
               mean_accepted_length=tokens / rounds)
    if mode == "cloud_only":
        return row
    row["identical_to_cloud_only"] = sum(run["target_token_ids"] == base["target_token_ids"] for run, base in paired) / len(paired) if paired else None
    # The ahead draft survives a round when it carries tokens into the next; the last round has no next.
    drafted_ahead = [(drafted, survived) for run in runs
                     for drafted, survived in zip(run["ahead_drafted_per_round"][:-1], run["ahead_survived_per_round"][:-1])
                     if drafted]
    if mode in AHEAD_MODES and drafted_ahead:
        row["ahead_survival_rate"] = sum(1 for _, survived in drafted_ahead if survived) / len(drafted_ahead)
    row["draft_len_mean"] = float(np.mean(_rounds(runs, "draft_len_per_round")))
    network = [trip - verify for trip, verify in zip(_rounds(runs, "round_trip_ms_per_round"), _rounds(runs, "verify_ms_per_round"))]
    if draft_step_ms is not None:
        row["model_ms_per_token"] = cost_model(mode, float(np.median(network)), float(np.median(_rounds(runs, "verify_ms_per_round"))),
                                               row["draft_len_mean"], draft_step_ms, row["ahead_survival_rate"] or 0.0,
                                               row["mean_accepted_length"])
    return row


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (profile, mode), in the order they ran."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["profile"], run["mode"])].append(run)
    rows = []
    for (profile, mode), group in groups.items():
        profile_runs = [run for run in runs if run["profile"] == profile]
        cloud = {(run["prompt_index"], run["repeat"]): run for run in profile_runs if run["mode"] == "cloud_only"}
        rows.append(_summary_row(profile, mode, group, cloud, _draft_step_ms(profile_runs)))
    return rows


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (  # (header, key, format)
    ("ttft ms", "ttft_ms_p50", ".0f"), ("answer ms", "total_ms_p50", ".0f"), ("p10", "total_ms_p10", ".0f"),
    ("p90", "total_ms_p90", ".0f"), ("x cloud", "ratio_vs_cloud_only", ".2f"), ("tok/s", "tokens_per_s", ".1f"),
    ("acc.len", "mean_accepted_length", ".2f"), ("k", "draft_len_mean", ".1f"), ("fwd/tok", "forwards_per_token", ".2f"),
    ("up B/rnd", "uplink_bytes_per_round", ".0f"), ("down B/rnd", "downlink_bytes_per_round", ".0f"),
    ("ahead surv", "ahead_survival_rate", ".0%"), ("busy ms/tok", "verifier_busy_ms_per_token", ".1f"),
    ("ms/tok", "ms_per_token_p50", ".1f"), ("model ms/tok", "model_ms_per_token", ".1f"),
    ("identical", "identical_to_cloud_only", ".0%"),
)


def print_latency_tables(report: dict) -> None:
    """One table per profile: medians over prompts x repeats, ratios paired with cloud_only."""
    interference = report["interference"]
    print(f"\ninterference on this machine: the verifier's busy time per target-only token is "
          f"{interference['verifier_ms_per_token_alone']:.1f} ms alone and "
          f"{interference['verifier_ms_per_token_while_edge_drafts']:.1f} ms while the edge drafts on its own CPUs "
          f"({interference['slowdown']:.2f}x): disjoint cores share the memory bus; separate machines do not")
    profiles = list(dict.fromkeys(row["profile"] for row in report["summary"]))
    for profile in profiles:
        rows = [row for row in report["summary"] if row["profile"] == profile]
        print(f"\n== {profile} (RTT {rows[0]['rtt_ms']:g} ms) | {report['pair']} | {report['placement']}")
        header = f"{'mode':<18}" + "".join(f"{title:>{max(len(title), 6) + 2}}" for title, _, _ in COLUMNS)
        print(header)
        print("-" * len(header))
        for row in rows:
            print(f"{row['mode']:<18}" + "".join(f"{_cell(row[key], spec):>{max(len(title), 6) + 2}}"
                                                  for title, key, spec in COLUMNS))
    print("\nuplink wire bytes per round by acceptance rule (top-k " f"{report['uplink_by_rule'][0]['top_k']}, "
          "HTTP/2 framing included, the opening message excluded):")
    for row in report["uplink_by_rule"]:
        print(f"  {row['rule']:<22}{row['uplink_bytes_per_round']:>8.0f} B/round over {row['rounds']} rounds "
              f"(opening message {row['opening_message_bytes']} B)")
    print("\nmodel ms/tok: the per-round cost model from this run's medians (round = RTT + verify + k x draft; with "
          "draft-ahead a surviving round costs max(RTT + verify, k x draft)), over accepted + 1 tokens per round.")


def plot_latency(report: dict, path: Path) -> None:
    """Time to the whole answer against RTT per mode, and the committed-tokens-per-round histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (answer_axis, histogram_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    modes = list(dict.fromkeys(row["mode"] for row in report["summary"]))
    for mode in modes:
        rows = sorted((row for row in report["summary"] if row["mode"] == mode), key=lambda row: row["rtt_ms"])
        answer_axis.plot([row["rtt_ms"] for row in rows], [row["total_ms_p50"] / 1e3 for row in rows], marker="o", label=mode)
    profiles = sorted({(row["rtt_ms"], row["profile"]) for row in report["summary"]})
    answer_axis.set_xscale("symlog", linthresh=1.0)
    answer_axis.set_xticks([rtt for rtt, _ in profiles], labels=[f"{name}\n{rtt:g} ms" for rtt, name in profiles])
    answer_axis.set(xlabel="network profile (RTT)", ylabel="time to the whole answer, median (s)",
                    title=f"{report['config']['max_new_tokens']} new tokens")
    answer_axis.grid(alpha=0.3)
    answer_axis.legend(fontsize=8)
    speculative = [mode for mode in modes if mode in SPECULATIVE_MODES]
    committed = [[count for run in report["runs"] if run["mode"] == mode for count in run["committed_per_round"]]
                 for mode in speculative]
    if committed and any(committed):
        top = max(max(counts, default=1) for counts in committed)
        histogram_axis.hist(committed, bins=np.arange(0.5, top + 1.5), label=speculative, density=True)
        histogram_axis.legend(fontsize=8)
    histogram_axis.set(xlabel="target tokens committed per round (accepted + 1)", ylabel="share of rounds",
                       title="accepted length, all profiles")
    figure.suptitle(f"{report['pair']}: {report['placement']}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
