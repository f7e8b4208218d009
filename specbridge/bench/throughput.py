"""`specbridge bench throughput`: the served verifier's throughput, speculative vs target-only, by client count.

Starts a verifier in a child process on loopback; for each client count runs that many
concurrent edge clients (each with its own ONNX draft) and then as many target-only Generate
clients; prints a table, writes JSON and draws the plot from that JSON.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import uvloop

from cloud_verifier.launcher import VerifierProcess
from cloud_verifier.server import ServeConfig
from edge_client.client import ClientResult, EdgeDraft, VerifierClient, load_edge_draft
from shared.decoding import DecodingConfig
from shared.errors import UserFacingError
from specbridge.bench.report import save_report
from specbridge.placement import PlacementSettings
from specbridge.v1 import specbridge_pb2 as pb

SPECULATIVE = "speculative"
TARGET_ONLY = "target_only"
WARMUP_TOKENS = 4


class ThroughputBenchConfigError(UserFacingError, ValueError):
    """A benchmark setting out of its valid range."""


@dataclass(frozen=True)
class ThroughputBenchConfig(PlacementSettings):
    pair: str = field(default="smollm2-gemma3", metadata={"help": "model pair (see `specbridge models list`)"})
    clients: tuple[int, ...] = field(default=(1, 4, 16), metadata={"help": "concurrent client counts to measure"})
    prompts: int = field(default=16, metadata={"help": "held-out prompts per measurement, shared out among the clients"})
    max_new_tokens: int = field(default=32, metadata={"help": "target tokens per prompt"})
    draft_len: int = field(default=6, metadata={"help": "draft tokens per round"})
    repeats: int = field(default=1, metadata={"help": "runs per measurement, pooled"})
    device: str = field(default="cpu", metadata={"help": "the verifier's torch device: cpu or cuda[:N]"})
    dtype: str = field(default="float32", metadata={"help": "the verifier's target weights dtype"})
    json: str = field(default="results/throughput.json", metadata={"help": "write results here"})
    plot: str = field(default="results/throughput.png", metadata={"help": "draw the plot here"})

    def __post_init__(self) -> None:
        if not self.clients or min(self.clients) < 1:
            raise ThroughputBenchConfigError(f"--clients must be counts >= 1, got {self.clients}")
        for name in ("prompts", "max_new_tokens", "draft_len", "repeats"):
            if getattr(self, name) < 1:
                raise ThroughputBenchConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        super().__post_init__()


def inter_token_ms(result: ClientResult) -> list[float]:
    """Each response's gap to the previous one, spread over the tokens it brought; the first response is time to first token."""
    gaps = np.diff(result.arrival_ms)
    return [gap / count for gap, count in zip(gaps, result.committed_per_response[1:]) for _ in range(count)]


STAT_DELTAS = ("forwards", "rows", "committed_tokens", "busy_ms")


def _stats_delta(before: pb.VerifierStats, after: pb.VerifierStats) -> dict[str, float]:
    return {name: getattr(after, name) - getattr(before, name) for name in STAT_DELTAS}


async def _run_clients(address: str, mode: str, drafts: list[EdgeDraft], prompts: list[str],
                       config: ThroughputBenchConfig) -> tuple[list[ClientResult], float]:
    """Each client works through its share of the prompts (client i takes prompts i, i + n, ...)."""

    async def one_client(index: int) -> list[ClientResult]:
        results = []
        async with VerifierClient(address) as client:
            for prompt in prompts[index :: len(drafts)]:
                if mode == SPECULATIVE:
                    results.append(await client.speculate(drafts[index], prompt, DecodingConfig(),
                                                          max_new_tokens=config.max_new_tokens, draft_len=config.draft_len))
                else:
                    results.append(await client.generate(prompt, DecodingConfig(), max_new_tokens=config.max_new_tokens))
        return results

    started = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(index) for index in range(len(drafts))))
    return [result for results in per_client for result in results], time.perf_counter() - started


async def _measure(address: str, mode: str, drafts: list[EdgeDraft], prompts: list[str],
                   config: ThroughputBenchConfig) -> dict:
    results, wall_s, deltas = [], 0.0, dict.fromkeys(STAT_DELTAS, 0)
    async with VerifierClient(address) as admin:
        for repeat in range(config.repeats):
            before = await admin.stats()
            run_results, run_wall_s = await _run_clients(address, mode, drafts, prompts, config)
            for name, value in _stats_delta(before, await admin.stats()).items():
                deltas[name] += value
            results += run_results
            wall_s += run_wall_s
            print(f"[throughput] {mode} clients={len(drafts)} repeat {repeat + 1}/{config.repeats}: "
                  f"{sum(len(r.target_token_ids) for r in run_results) / run_wall_s:.1f} tokens/s", file=sys.stderr)
    tokens = sum(len(result.target_token_ids) for result in results)
    itl = [gap for result in results for gap in inter_token_ms(result)]
    row = {
        "clients": len(drafts),
        "tokens_per_s": tokens / wall_s,
        "itl_ms_p50": float(np.percentile(itl, 50)) if itl else None,
        "itl_ms_p90": float(np.percentile(itl, 90)) if itl else None,
        "ttft_ms_p50": float(np.median([result.arrival_ms[0] for result in results])),
        "forwards_per_token": deltas["forwards"] / deltas["committed_tokens"],
        "rows_per_forward": deltas["rows"] / deltas["forwards"],
        # The verifier's own cost per token (forwards and acceptance), whatever the edges' speed: capacity.
        "verifier_busy_ms_per_token": deltas["busy_ms"] / deltas["committed_tokens"],
        "committed_tokens": tokens,
        "wall_s": wall_s,
    }
    if mode == SPECULATIVE:
        row["mean_accepted_length"] = tokens / sum(result.rounds for result in results)
        row["draft_ms_p50"] = float(np.median([ms for result in results for ms in result.draft_ms_per_round]))
        row["round_trip_ms_p50"] = float(np.median([ms for result in results for ms in result.round_trip_ms]))
    return row


async def _bench(address: str, drafts: list[EdgeDraft], prompts: list[str], config: ThroughputBenchConfig) -> dict:
    async with VerifierClient(address) as warmup:
        await warmup.speculate(drafts[0], prompts[0], DecodingConfig(), max_new_tokens=WARMUP_TOKENS, draft_len=config.draft_len)
        await warmup.generate(prompts[0], DecodingConfig(), max_new_tokens=WARMUP_TOKENS)
    results: dict[str, dict[str, dict]] = {SPECULATIVE: {}, TARGET_ONLY: {}}
    for count in config.clients:
        for mode in (SPECULATIVE, TARGET_ONLY):
            results[mode][str(count)] = await _measure(address, mode, drafts[:count], prompts, config)
    return results


def run_throughput_bench(config: ThroughputBenchConfig) -> dict:
    from specbridge.model_zoo import prepare_pair
    from specbridge.prompts import HELD_OUT_PROMPTS

    pair = prepare_pair(config.pair)
    prompts = [HELD_OUT_PROMPTS[index % len(HELD_OUT_PROMPTS)] for index in range(max(config.prompts, max(config.clients)))]
    placement = config.placement
    note = (f"{placement.describe()}; the edge clients (one onnxruntime thread each) share the edge CPUs, over "
            f"loopback")
    print(f"[throughput] {config.pair}: {note}", file=sys.stderr)
    serve_config = ServeConfig(target=str(pair.target_hf_dir), port=0, max_batch=max(32, max(config.clients)),
                               threads=placement.verifier_threads, device=config.device, dtype=config.dtype)
    with VerifierProcess(serve_config, cpus=placement.verifier_cpus) as verifier, placement.edge_pinned():
        first = load_edge_draft(pair.draft_onnx_dir, threads=1)
        drafts = [first] + [first.fork() for _ in range(max(config.clients) - 1)]
        results = uvloop.run(_bench(verifier.address, drafts, prompts, config))
    report = {"pair": config.pair, "placement": placement.describe(), "note": note, "config": asdict(config),
              "results": results}
    _print_table(report)
    save_report(report, "throughput", config.json, plot_throughput, config.plot)
    return report


def _print_table(report: dict) -> None:
    results = report["results"]
    header = (f"{'clients':>7} {'spec tok/s':>10} {'target tok/s':>12} {'ratio':>6} {'spec ITL p50/p90 ms':>20} "
              f"{'target ITL p50/p90 ms':>22} {'fwd/tok spec':>12} {'fwd/tok tgt':>11} {'rows/fwd spec':>13} {'rows/fwd tgt':>12} "
              f"{'busy ms/tok spec':>16} {'busy ms/tok tgt':>15} {'spec draft/verify ms':>20}")
    print(f"{report['pair']}: {report['note']}")
    print(header)
    print("-" * len(header))
    for count, spec in results[SPECULATIVE].items():
        target = results[TARGET_ONLY][count]
        print(f"{count:>7} {spec['tokens_per_s']:>10.1f} {target['tokens_per_s']:>12.1f} "
              f"{spec['tokens_per_s'] / target['tokens_per_s']:>5.2f}x "
              f"{_pair_ms(spec):>20} {_pair_ms(target):>22} {spec['forwards_per_token']:>12.3f} "
              f"{target['forwards_per_token']:>11.3f} {spec['rows_per_forward']:>13.2f} {target['rows_per_forward']:>12.2f} "
              f"{spec['verifier_busy_ms_per_token']:>16.1f} {target['verifier_busy_ms_per_token']:>15.1f} "
              f"{spec['draft_ms_p50']:>10.1f}/{spec['round_trip_ms_p50']:<9.1f}")


def _pair_ms(row: dict) -> str:
    return "-" if row["itl_ms_p50"] is None else f"{row['itl_ms_p50']:.1f}/{row['itl_ms_p90']:.1f}"


def plot_throughput(report: dict, path: Path) -> None:
    """Tokens/s and median inter-token latency against client count, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput_axis, latency_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in report["results"].items():
        counts = [row["clients"] for row in rows.values()]
        throughput_axis.plot(counts, [row["tokens_per_s"] for row in rows.values()], marker="o", label=mode)
        latency_axis.plot(counts, [row["itl_ms_p50"] for row in rows.values()], marker="o", label=mode)
    throughput_axis.set(xlabel="concurrent clients", ylabel="committed tokens/s (server)", title="throughput")
    latency_axis.set(xlabel="concurrent clients", ylabel="inter-token latency p50 (ms)", title="per-client latency")
    for axis in (throughput_axis, latency_axis):
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, labels=[str(count) for count in counts])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{report['pair']}: {report['placement']}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
