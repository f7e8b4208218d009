"""`specbridge bench load`: many edge sessions against one verifier for a while; does it stay healthy?

Starts the verifier in a child process (pinned, like every benchmark) and N edge clients in this
process, each its own connection and fork of the draft (as N devices would be), opening session
after session until the duration ends: mixed prompts, draft lengths and decoding, some cancelled
mid-stream. Samples the verifier's RSS (by pid) and its live sessions and KV bytes (GetStats)
before, during and after; prints a table and WARNING lines, writes JSON, plots from that JSON.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import uvloop

from cloud_verifier.launcher import VerifierProcess
from cloud_verifier.server import ServeConfig
from edge_client.client import EdgeClientError, EdgeDraft, VerifierClient, load_edge_draft
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.errors import UserFacingError
from specbridge.bench.report import pyplot, save_figure, save_report
from specbridge.placement import PlacementSettings

DRAFT_LENS: tuple[int | None, ...] = (None, 2, 4, 8)  # None: the adaptive length, the product's default
SAMPLED_RULES = (AcceptanceRule.POINT_MASS, AcceptanceRule.DRAFT_PROBS)
SAMPLED_TEMPERATURE = 0.8
COMPLETED = "completed"
CANCELLED = "cancelled"
OVERLOADED = "RESOURCE_EXHAUSTED"
NO_STATUS = "NO_STATUS"  # the client gave up on a session without a gRPC status (e.g. the stream ended early)
SETTLE_TIMEOUT_S = 30.0  # how long the verifier may take to free the last sessions once all clients stopped
PROGRESS_EVERY_S = 10.0
MIB = 1024 * 1024


class LoadBenchConfigError(UserFacingError, ValueError):
    """A benchmark setting out of its valid range."""


@dataclass(frozen=True)
class LoadBenchConfig(PlacementSettings):
    pair: str = field(default="smollm2-gemma3", metadata={"help": "model pair (see `specbridge models list`)"})
    clients: int = field(default=8, metadata={"help": "concurrent edge clients, each opening session after session"})
    duration: float = field(default=20.0, metadata={"help": "seconds during which clients open new sessions (open ones "
                                                            "then run to their end)"})
    max_sessions: int | None = field(default=None, metadata={
        "help": "the verifier's --max-sessions (unset: its default); at most --clients provokes RESOURCE_EXHAUSTED"})
    max_new_tokens: int = field(default=32, metadata={"help": "target tokens per session at most"})
    cancel_fraction: float = field(default=0.1, metadata={"help": "share of sessions cancelled once their first text "
                                                                  "arrives"})
    sampled_fraction: float = field(default=0.5, metadata={"help": "share of sessions sampled (seeded); the rest greedy"})
    seed: int = field(default=0, metadata={"help": "seed of every client's choices (prompt, draft length, decoding, cancel)"})
    sample_interval_s: float = field(default=0.5, metadata={"help": "seconds between samples of the verifier's memory"})
    rss_tolerance_mib: float = field(default=64.0, metadata={"help": "RSS growth (after minus before) past which a "
                                                                     "WARNING is printed"})
    json: str = field(default="results/load.json", metadata={"help": "write results here"})
    plot: str = field(default="results/load.png", metadata={"help": "draw the plot here (from the JSON)"})

    def __post_init__(self) -> None:
        for name in ("clients", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise LoadBenchConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_sessions is not None and self.max_sessions < 1:
            raise LoadBenchConfigError(f"--max-sessions must be >= 1, got {self.max_sessions}")
        for name in ("duration", "sample_interval_s"):
            if not getattr(self, name) > 0:
                raise LoadBenchConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("cancel_fraction", "sampled_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise LoadBenchConfigError(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(self, name)}")
        if self.rss_tolerance_mib < 0:
            raise LoadBenchConfigError(f"--rss-tolerance-mib must be >= 0, got {self.rss_tolerance_mib}")
        super().__post_init__()


@dataclass(frozen=True)
class SessionPlan:
    """One session a client will open."""

    prompt: str
    draft_len: int | None
    decoding: DecodingConfig
    cancel: bool  # end it as soon as its first text arrives


@dataclass(frozen=True)
class SessionOutcome:
    status: str  # COMPLETED, CANCELLED or the gRPC status code's name
    wall_ms: float
    first_token_ms: float | None = None  # completed sessions only
    committed_tokens: int = 0  # completed sessions only
    reconnects: int = 0  # completed sessions only: sessions the client opened again (a full verifier said when)


@dataclass(frozen=True)
class VerifierSample:
    at_s: float  # from the start of the load
    rss_bytes: int
    cache_bytes: int
    live_sessions: int
    # Whether the verifier was working (forwards so far) and got the CPU to (its CPU seconds): a stall shows which side.
    forwards: int
    cpu_s: float


def plan_session(rng: random.Random, prompts: tuple[str, ...], config: LoadBenchConfig) -> SessionPlan:
    if rng.random() < config.sampled_fraction:
        decoding = DecodingConfig(mode=DecodeMode.SAMPLE, temperature=SAMPLED_TEMPERATURE, seed=rng.randrange(2**31),
                                  rule=rng.choice(SAMPLED_RULES))
    else:
        decoding = DecodingConfig()
    return SessionPlan(prompt=rng.choice(prompts), draft_len=rng.choice(DRAFT_LENS), decoding=decoding,
                       cancel=rng.random() < config.cancel_fraction)


def overload_provoked(clients: int, max_sessions: int) -> bool:
    # At equality a client whose cancelled session the verifier has not freed yet may open its next one too.
    return clients >= max_sessions


async def _session(client: VerifierClient, draft: EdgeDraft, plan: SessionPlan, max_new_tokens: int) -> SessionOutcome:
    started = time.perf_counter()
    first_text = asyncio.Event()
    speculation = asyncio.ensure_future(client.speculate(draft, plan.prompt, plan.decoding, max_new_tokens=max_new_tokens,
                                                         draft_len=plan.draft_len, on_text=lambda _: first_text.set()))
    try:
        if plan.cancel:
            text_arrived = asyncio.ensure_future(first_text.wait())
            await asyncio.wait([speculation, text_arrived], return_when=asyncio.FIRST_COMPLETED)
            text_arrived.cancel()
            if not speculation.done():
                speculation.cancel()  # the client cancels its call: the verifier frees the session at once
                await asyncio.wait([speculation])
            if speculation.cancelled():  # else it ended first, by itself: its result or error counts as it is
                return SessionOutcome(CANCELLED, wall_ms=(time.perf_counter() - started) * 1e3)
        result = await speculation
    except EdgeClientError as error:
        return SessionOutcome(error.code.name if error.code is not None else NO_STATUS,
                              wall_ms=(time.perf_counter() - started) * 1e3)
    return SessionOutcome(COMPLETED, wall_ms=result.wall_ms, first_token_ms=result.arrival_ms[0],
                          committed_tokens=len(result.target_token_ids), reconnects=result.reconnects)


async def _client(address: str, draft: EdgeDraft, rng: random.Random, prompts: tuple[str, ...],
                  config: LoadBenchConfig, deadline: float) -> list[SessionOutcome]:
    """Sessions one after another on one connection (an edge device of its own) until the deadline."""
    outcomes = []
    async with VerifierClient(address) as client:
        while time.perf_counter() < deadline:
            # A cancelled session returns once its drafting thread is done: the next one may draft on the same draft.
            outcomes.append(await _session(client, draft, plan_session(rng, prompts, config), config.max_new_tokens))
    return outcomes


class _Sampler:
    """The verifier's RSS (its process, by pid) and its live sessions and KV bytes (GetStats)."""

    def __init__(self, admin: VerifierClient, pid: int, load_started: float) -> None:
        self._admin = admin
        self._process = psutil.Process(pid)
        self._load_started = load_started
        self.samples: list[VerifierSample] = []

    async def sample(self) -> VerifierSample:
        stats = await self._admin.stats()
        cpu = self._process.cpu_times()
        sample = VerifierSample(at_s=time.perf_counter() - self._load_started, rss_bytes=self._process.memory_info().rss,
                                cache_bytes=stats.cache_bytes, live_sessions=stats.live_sessions, forwards=stats.forwards,
                                cpu_s=cpu.user + cpu.system)
        self.samples.append(sample)
        return sample

    async def sample_every(self, interval_s: float) -> None:
        """Samples until cancelled, with a progress line on stderr every PROGRESS_EVERY_S."""
        shown_at = 0.0
        while True:
            sample = await self.sample()
            if sample.at_s - shown_at >= PROGRESS_EVERY_S:
                shown_at = sample.at_s
                print(f"[load] {sample.at_s:.0f} s: {sample.live_sessions} live sessions, verifier RSS "
                      f"{sample.rss_bytes / 2**20:.0f} MiB, KV {sample.cache_bytes / 2**20:.1f} MiB", file=sys.stderr)
            await asyncio.sleep(interval_s)

    async def sample_once_idle(self, interval_s: float) -> VerifierSample:
        """A sample once no session is live (the verifier frees cancelled ones asynchronously), or at the timeout."""
        settle_by = time.perf_counter() + SETTLE_TIMEOUT_S
        while (sample := await self.sample()).live_sessions and time.perf_counter() < settle_by:
            await asyncio.sleep(interval_s)
        return sample


async def _warm_up(admin: VerifierClient, drafts: list[EdgeDraft], prompts: tuple[str, ...], max_new_tokens: int) -> None:
    """A session per draft at once, over every decoding path: the allocator keeps what the largest batch took (its
    high-water mark), and the baseline must already include it, or the run would report it as growth."""
    paths = (DecodingConfig(), *(DecodingConfig(mode=DecodeMode.SAMPLE, seed=0, rule=rule) for rule in SAMPLED_RULES))
    await asyncio.gather(*(admin.speculate(draft, prompts[index % len(prompts)], paths[index % len(paths)],
                                           max_new_tokens=max_new_tokens) for index, draft in enumerate(drafts)))


async def _load(address: str, pid: int, drafts: list[EdgeDraft], prompts: tuple[str, ...],
                config: LoadBenchConfig, max_sessions: int) -> dict:
    async with VerifierClient(address) as admin:
        print(f"[load] warming up: {min(len(drafts), max_sessions)} sessions at once", file=sys.stderr)
        await _warm_up(admin, drafts[:max_sessions], prompts, config.max_new_tokens)
        started = time.perf_counter()
        sampler = _Sampler(admin, pid, started)
        before = await sampler.sample_once_idle(config.sample_interval_s)
        sampling = asyncio.ensure_future(sampler.sample_every(config.sample_interval_s))
        deadline = started + config.duration
        per_client = await asyncio.gather(*(_client(address, draft, random.Random(f"{config.seed}:{index}"),
                                                    prompts, config, deadline) for index, draft in enumerate(drafts)))
        wall_s = time.perf_counter() - started
        sampling.cancel()
        after = await sampler.sample_once_idle(config.sample_interval_s)
    outcomes = [outcome for outcomes in per_client for outcome in outcomes]
    return {"wall_s": wall_s, "outcomes": outcomes, "before": before, "after": after, "samples": sampler.samples}


def summarize(outcomes: list[SessionOutcome], wall_s: float, overload_expected: bool) -> dict:
    """Sessions, tokens, latencies and errors by status; a status is provoked when the run asked for it."""
    completed = [outcome for outcome in outcomes if outcome.status == COMPLETED]
    errors = Counter(outcome.status for outcome in outcomes if outcome.status not in (COMPLETED, CANCELLED))
    provoked = {OVERLOADED} if overload_expected else set()
    latency_ms = [outcome.wall_ms for outcome in completed]
    first_token_ms = [outcome.first_token_ms for outcome in completed]
    tokens = sum(outcome.committed_tokens for outcome in completed)
    return {
        "sessions": len(outcomes),
        "completed": len(completed),
        "cancelled": sum(outcome.status == CANCELLED for outcome in outcomes),
        "committed_tokens": tokens,
        # A refused session the client retried after the verifier's retry-after hint, and that then completed.
        "reconnects": sum(outcome.reconnects for outcome in completed),
        "tokens_per_s": tokens / wall_s,
        "wall_s": wall_s,
        **{f"session_ms_p{q}": _percentile(latency_ms, q) for q in (50, 90, 99)},
        **{f"first_token_ms_p{q}": _percentile(first_token_ms, q) for q in (50, 99)},
        "provoked_errors": {code: count for code, count in errors.items() if code in provoked},
        "unexpected_errors": {code: count for code, count in errors.items() if code not in provoked},
    }


def _percentile(values: list[float], q: int) -> float | None:
    return float(np.percentile(values, q)) if values else None


def memory_warnings(before: dict, after: dict, rss_tolerance_mib: float) -> list[str]:
    warnings = []
    growth_mib = (after["rss_bytes"] - before["rss_bytes"]) / MIB
    if growth_mib > rss_tolerance_mib:
        warnings.append(f"verifier RSS grew by {growth_mib:.1f} MiB over the run (tolerance {rss_tolerance_mib:g} MiB)")
    if after["live_sessions"] or after["cache_bytes"]:
        warnings.append(f"{after['live_sessions']} sessions and {after['cache_bytes']} KV bytes still live after every "
                        f"client stopped")
    return warnings


def run_load_bench(config: LoadBenchConfig) -> dict:
    from specbridge.model_zoo import prepare_pair
    from specbridge.prompts import HARD_PROMPTS, HELD_OUT_PROMPTS

    pair = prepare_pair(config.pair)
    placement = config.placement
    serve_config = ServeConfig(target=str(pair.target_hf_dir), port=0, threads=placement.verifier_threads,
                               **({} if config.max_sessions is None else {"max_sessions": config.max_sessions}))
    overload_expected = overload_provoked(config.clients, serve_config.max_sessions)
    note = (f"{placement.describe()}; {config.clients} edge clients (one onnxruntime thread each) draft on the edge CPUs, "
            f"so with many clients drafting paces the load: this tests the verifier's robustness, not its capacity")
    print(f"[load] {config.pair}: {note}", file=sys.stderr)
    with VerifierProcess(serve_config, cpus=placement.verifier_cpus) as verifier, placement.edge_pinned():
        loaded = load_edge_draft(pair.draft_onnx_dir, threads=1)
        drafts = [loaded.fork() for _ in range(config.clients)]  # before the clock: one per client, as on N devices
        run = uvloop.run(_load(verifier.address, verifier.pid, drafts, HELD_OUT_PROMPTS + HARD_PROMPTS, config,
                               serve_config.max_sessions))
    before, after = asdict(run["before"]), asdict(run["after"])
    report = {"pair": config.pair, "placement": placement.describe(), "note": note, "config": asdict(config),
              "max_sessions": serve_config.max_sessions, "overload_provoked": overload_expected,
              "summary": summarize(run["outcomes"], run["wall_s"], overload_expected),
              "before": before, "after": after, "peak": {name: max(getattr(sample, name) for sample in run["samples"])
                                                         for name in ("rss_bytes", "cache_bytes", "live_sessions")},
              # Far below the verifier's CPUs' count, it was starved (other work on its cores), not the bottleneck.
              "verifier_cpu_cores": (after["cpu_s"] - before["cpu_s"]) / (after["at_s"] - before["at_s"]),
              "samples": [asdict(sample) for sample in run["samples"]],
              "warnings": memory_warnings(before, after, config.rss_tolerance_mib)}
    if report["summary"]["unexpected_errors"]:
        report["warnings"].append(f"errors nobody provoked: {report['summary']['unexpected_errors']}")
    _print_table(report)
    save_report(report, "load", config.json, plot_load, config.plot)
    return report


def _print_table(report: dict) -> None:
    summary, before, peak, after = report["summary"], report["before"], report["peak"], report["after"]
    config = report["config"]
    print(f"{report['pair']}: {report['note']}")
    print(f"{config['clients']} clients for {config['duration']:g} s against --max-sessions {report['max_sessions']}"
          f"{' (overload provoked)' if report['overload_provoked'] else ''}")
    rows = (
        ("sessions completed / cancelled / all", f"{summary['completed']} / {summary['cancelled']} / {summary['sessions']}"),
        ("committed tokens (completed sessions)", f"{summary['committed_tokens']}"),
        ("tokens/s", f"{summary['tokens_per_s']:.1f} over {summary['wall_s']:.1f} s"),
        ("session ms p50 / p90 / p99", " / ".join(_ms(summary[f"session_ms_p{q}"]) for q in (50, 90, 99))),
        ("first token ms p50 / p99", " / ".join(_ms(summary[f"first_token_ms_p{q}"]) for q in (50, 99))),
        ("reconnects (retried, then completed)", f"{summary['reconnects']}"),
        ("errors provoked", _codes(summary["provoked_errors"])),
        ("errors unexpected", _codes(summary["unexpected_errors"])),
        ("verifier RSS MiB before / peak / after", " / ".join(f"{sample['rss_bytes'] / MIB:.1f}" for sample in (before, peak, after))),
        ("KV bytes before / peak / after", " / ".join(f"{sample['cache_bytes']}" for sample in (before, peak, after))),
        ("live sessions peak / after", f"{peak['live_sessions']} / {after['live_sessions']}"),
        ("verifier CPU used (cores, mean)", f"{report['verifier_cpu_cores']:.2f} of {len(config['verifier_cpus'])}"),
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} x{count}" for code, count in counts.items()) or "none"


def plot_load(report: dict, path: Path) -> None:
    """The verifier's RSS, KV bytes and live sessions over time; the load runs between the dashed lines."""
    plt = pyplot()
    samples = report["samples"]
    times = [sample["at_s"] for sample in samples]
    figure, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    series = (("rss_bytes", MIB, "verifier RSS (MiB)"), ("cache_bytes", MIB, "live KV cache (MiB)"),
              ("live_sessions", 1, "live sessions"))
    for axis, (name, unit, label) in zip(axes, series):
        axis.plot(times, [sample[name] / unit for sample in samples], marker=".")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        for at_s in (0.0, report["summary"]["wall_s"]):
            axis.axvline(at_s, color="grey", linestyle="--", linewidth=1)
    axes[-1].set_xlabel("seconds from the start of the load")
    config = report["config"]
    figure.suptitle(f"{report['pair']}: {config['clients']} clients, {config['duration']:g} s, "
                    f"--max-sessions {report['max_sessions']}\n{report['placement']}", fontsize=9)
    save_figure(figure, path)
