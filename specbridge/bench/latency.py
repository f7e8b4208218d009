"""`specbridge bench latency`: at a given round-trip time, is speculation faster than asking the cloud?

Starts the verifier (a child process pinned to its CPUs, or uses `--server`), one delay proxy per
network profile (specbridge.netsim, in this process), and pins this process, the edge, to its own
CPUs. Every mode runs the same prompts through the same proxy; ratios against `cloud_only` are
paired by prompt and repeat. The report (table, cost model, JSON, plots) is in latency_report.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import uvloop
from tqdm import tqdm

from edge_client.client import ClientResult, EdgeDraft, VerifierClient, load_edge_draft, session_request
from edge_client.draft_runtime import Variant
from edge_client.drafter import Drafter
from shared.decoding import AcceptanceRule, DecodeMode, DecodingConfig
from shared.errors import UserFacingError
from shared.wire import encode_session_request
from specbridge.bench.report import save_report
from specbridge.netsim import PROFILES, DelayProxy
from specbridge.placement import PlacementSettings

GREEDY = DecodingConfig()
WARMUP_TOKENS = 8
INTERFERENCE_TOKENS = 24
RULE_TOP_K = 8
CODE_PROMPTS = 9  # HELD_OUT_PROMPTS opens with nine code prompts, then seven of prose


class LatencyBenchConfigError(UserFacingError, ValueError):
    """A benchmark setting out of its valid range."""


class Mode(StrEnum):
    CLOUD_ONLY = "cloud_only"  # target-only Generate, streamed through the proxy
    SPECULATIVE = "speculative"  # fixed draft length, no draft-ahead
    SPECULATIVE_AHEAD = "speculative_ahead"  # draft-ahead and the adaptive length: the product's default
    AHEAD_FIXED = "ahead_fixed"  # draft-ahead at the fixed length: what draft-ahead alone buys
    ADAPTIVE = "adaptive"  # the adaptive length without draft-ahead: what the controller alone buys
    EDGE_ONLY = "edge_only"  # the draft alone: a lower bound, not lossless, for reference


# (fixed draft length or None for adaptive, draft-ahead) per speculative mode
SPECULATIVE_MODES: dict[Mode, tuple[bool, bool]] = {
    Mode.SPECULATIVE: (True, False),
    Mode.SPECULATIVE_AHEAD: (False, True),
    Mode.AHEAD_FIXED: (True, True),
    Mode.ADAPTIVE: (False, False),
}


class PromptSet(StrEnum):
    CODE = "code"
    PROSE = "prose"
    MIXED = "mixed"


@dataclass(frozen=True)
class LatencyBenchConfig(PlacementSettings):
    pair: str = field(default="smollm2-gemma3", metadata={"help": "model pair (see `specbridge models list`)"})
    profiles: str = field(default="lan,wifi,4g,cross-region",
                          metadata={"help": "network profiles, comma-separated: " + ", ".join(PROFILES)})
    modes: str = field(default=",".join(Mode), metadata={"help": "modes to run, comma-separated: " + ", ".join(Mode)})
    prompt_set: PromptSet = field(default=PromptSet.MIXED, metadata={"help": "held-out prompts: code, prose or both interleaved"})
    prompts: int = field(default=4, metadata={"help": "prompts per profile and mode"})
    max_new_tokens: int = field(default=64, metadata={"help": "target tokens per answer"})
    repeats: int = field(default=3, metadata={"help": "runs of every prompt (medians are over prompts x repeats)"})
    draft_len: int = field(default=6, metadata={"help": "the fixed draft length of the speculative and ahead_fixed modes"})
    edge_variant: Variant = field(default=Variant.FP32, metadata={"help": "draft weights: fp32 (laptop) or int8 (phone class)"})
    server: str | None = field(default=None, metadata={"help": "use this running verifier HOST:PORT instead of starting one"})
    seed: int = field(default=0, metadata={"help": "seed of the proxies' jitter"})
    json: str = field(default="results/latency.json", metadata={"help": "write results here"})
    plot: str = field(default="results/latency.png", metadata={"help": "draw the plots here (from the JSON)"})

    def __post_init__(self) -> None:
        for name in ("prompts", "max_new_tokens", "repeats", "draft_len"):
            if getattr(self, name) < 1:
                raise LatencyBenchConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        unknown = [p for p in self.profile_names if p not in PROFILES]
        if unknown or not self.profile_names:
            raise LatencyBenchConfigError(f"--profiles must name some of {', '.join(PROFILES)}; got {self.profiles!r}")
        try:
            modes = self.mode_list
        except ValueError:
            raise LatencyBenchConfigError(f"--modes must name some of {', '.join(Mode)}; got {self.modes!r}") from None
        if not modes:
            raise LatencyBenchConfigError("--modes names no mode")
        super().__post_init__()

    @property
    def profile_names(self) -> list[str]:
        return [name.strip() for name in self.profiles.split(",") if name.strip()]

    @property
    def mode_list(self) -> list[Mode]:
        # cloud_only is the baseline every ratio needs: it always runs, first.
        named = [Mode(name.strip()) for name in self.modes.split(",") if name.strip()]
        return [Mode.CLOUD_ONLY] + [mode for mode in named if mode is not Mode.CLOUD_ONLY]


def choose_prompts(prompt_set: PromptSet, count: int) -> list[str]:
    from specbridge.prompts import HELD_OUT_PROMPTS

    code, prose = list(HELD_OUT_PROMPTS[:CODE_PROMPTS]), list(HELD_OUT_PROMPTS[CODE_PROMPTS:])
    pool = {PromptSet.CODE: code, PromptSet.PROSE: prose,
            PromptSet.MIXED: [p for pair in zip(code, prose) for p in pair]}[prompt_set]
    return [pool[index % len(pool)] for index in range(count)]


def _speculative_run(result: ClientResult) -> dict:
    rounds = result.speculation_rounds
    return {
        "ttft_ms": result.arrival_ms[0], "total_ms": result.wall_ms, "tokens": len(result.target_token_ids),
        "target_token_ids": list(result.target_token_ids), "rounds": len(rounds),
        "committed_per_round": [r.committed_count for r in rounds], "draft_len_per_round": [r.draft_len for r in rounds],
        "draft_ms_per_round": [r.draft_ms for r in rounds], "verify_ms_per_round": [r.verify_ms for r in rounds],
        "round_trip_ms_per_round": [r.round_trip_ms for r in rounds],
        "ahead_drafted_per_round": [r.ahead_drafted for r in rounds],
        "ahead_survived_per_round": [r.ahead_survived for r in rounds],
    }


def _cloud_run(result: ClientResult) -> dict:
    return {"ttft_ms": result.arrival_ms[0], "total_ms": result.wall_ms, "tokens": len(result.target_token_ids),
            "target_token_ids": list(result.target_token_ids), "rounds": result.rounds}


def edge_only_run(draft: EdgeDraft, prompt: str, max_new_tokens: int) -> dict:
    """The draft decoding alone, greedy, as many draft tokens as the answer has target tokens."""
    drafter = Drafter(draft.runtime, draft.vocab)
    started = time.perf_counter()
    drafter.start(prompt)
    drafter.propose(1, GREEDY)
    ttft_ms = (time.perf_counter() - started) * 1e3
    tokens = 1 + drafter.draft_ahead(max_new_tokens - 1, GREEDY, threading.Event())
    return {"ttft_ms": ttft_ms, "total_ms": (time.perf_counter() - started) * 1e3, "tokens": tokens, "rounds": 0}


async def _one_run(mode: Mode, client: VerifierClient, draft: EdgeDraft, prompt: str, config: LatencyBenchConfig) -> dict:
    if mode is Mode.CLOUD_ONLY:
        return _cloud_run(await client.generate(prompt, GREEDY, max_new_tokens=config.max_new_tokens))
    if mode is Mode.EDGE_ONLY:
        return await asyncio.to_thread(edge_only_run, draft, prompt, config.max_new_tokens)
    fixed, ahead = SPECULATIVE_MODES[mode]
    return _speculative_run(await client.speculate(draft, prompt, GREEDY, max_new_tokens=config.max_new_tokens,
                                                   draft_len=config.draft_len if fixed else None, draft_ahead=ahead))


async def profile_runs(profile_name: str, address: str, admin: VerifierClient, draft: EdgeDraft, prompts: list[str],
                       config: LatencyBenchConfig, advance: Callable[[], None]) -> list[dict]:
    """Every mode on every prompt, `config.repeats` times, through one delay proxy in front of `address`."""
    runs = []
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(DelayProxy(PROFILES[profile_name], address, seed=config.seed))
        client = await stack.enter_async_context(VerifierClient(proxy.address))
        await client.stats()  # the channel's connection handshakes happen here, outside every measurement
        for repeat in range(config.repeats):
            for prompt_index, prompt in enumerate(prompts):
                for mode in config.mode_list:
                    before, uplink, downlink = await admin.stats(), proxy.uplink_bytes, proxy.downlink_bytes
                    run = await _one_run(mode, client, draft, prompt, config)
                    after = await admin.stats()
                    run.update(profile=profile_name, rtt_ms=PROFILES[profile_name].rtt_ms, mode=mode.value,
                               prompt_index=prompt_index, repeat=repeat,
                               uplink_bytes=proxy.uplink_bytes - uplink, downlink_bytes=proxy.downlink_bytes - downlink,
                               forwards=after.forwards - before.forwards, busy_ms=after.busy_ms - before.busy_ms)
                    runs.append(run)
                    advance()
    return runs


# Every acceptance rule, sampled except greedy: what each sends per round (greedy and point-mass: text only).
RULE_CONFIGS: dict[str, DecodingConfig] = {
    "greedy": GREEDY,
    **{rule.value: DecodingConfig(mode=DecodeMode.SAMPLE, seed=0, rule=rule) for rule in AcceptanceRule},
}


async def rule_uplink(address: str, draft: EdgeDraft, prompt: str, config: LatencyBenchConfig) -> list[dict]:
    """Uplink wire bytes per round for each acceptance rule, the session's opening message excluded.

    Counted by a loopback proxy, so HTTP/2 framing is included; the draft_probs rule's opening message
    also carries the draft vocabulary's bytes once, which is why it is excluded here.
    """
    rows = []
    async with DelayProxy(PROFILES["loopback"], address) as proxy, VerifierClient(proxy.address) as client:
        await client.stats()
        for name, decoding in RULE_CONFIGS.items():
            uplink = proxy.uplink_bytes
            result = await client.speculate(draft, prompt, decoding, max_new_tokens=config.max_new_tokens,
                                            draft_len=config.draft_len, top_k_size=RULE_TOP_K)
            opening = encode_session_request(session_request(draft, prompt, decoding,
                                                             max_new_tokens=config.max_new_tokens)).ByteSize()
            rows.append({"rule": name, "top_k": RULE_TOP_K, "rounds": result.rounds,
                         "uplink_bytes_per_round": (proxy.uplink_bytes - uplink - opening) / result.rounds,
                         "opening_message_bytes": opening})
    return rows


def _draft_until(draft: EdgeDraft, prompt: str, stop: threading.Event) -> None:
    drafter = Drafter(draft.runtime, draft.vocab)
    while not stop.is_set():
        drafter.start(prompt)
        drafter.draft_ahead(INTERFERENCE_TOKENS, GREEDY, stop)


async def measure_interference(admin: VerifierClient, draft: EdgeDraft, prompt: str) -> dict:
    """The verifier's busy ms per target-only token alone, and while this process drafts on the edge CPUs.

    Disjoint cores still share the memory bus: where both sides stream their weights from DRAM, drafting
    slows the verifier down, which separate machines would not (see the report's header).
    """
    async def busy_ms_per_token() -> float:
        before = await admin.stats()
        result = await admin.generate(prompt, GREEDY, max_new_tokens=INTERFERENCE_TOKENS)
        return ((await admin.stats()).busy_ms - before.busy_ms) / len(result.target_token_ids)

    alone_ms = await busy_ms_per_token()
    stop = threading.Event()
    drafting = asyncio.ensure_future(asyncio.to_thread(_draft_until, draft, prompt, stop))
    try:
        loaded_ms = await busy_ms_per_token()
    finally:
        stop.set()
        await drafting
    return {"verifier_ms_per_token_alone": alone_ms, "verifier_ms_per_token_while_edge_drafts": loaded_ms,
            "slowdown": loaded_ms / alone_ms}


async def _bench(address: str, draft: EdgeDraft, prompts: list[str],
                 config: LatencyBenchConfig) -> tuple[dict, list[dict], list[dict]]:
    async with VerifierClient(address) as admin:
        await admin.speculate(draft, prompts[0], GREEDY, max_new_tokens=WARMUP_TOKENS)
        await admin.generate(prompts[0], GREEDY, max_new_tokens=WARMUP_TOKENS)
        interference = await measure_interference(admin, draft, prompts[0])
        total = len(config.profile_names) * config.repeats * len(prompts) * len(config.mode_list)
        runs: list[dict] = []
        with tqdm(total=total, unit="run", desc="latency", file=sys.stderr, mininterval=1.0) as bar:
            for profile_name in config.profile_names:
                bar.set_postfix_str(profile_name)
                runs += await profile_runs(profile_name, address, admin, draft, prompts, config, bar.update)
        uplink_by_rule = await rule_uplink(address, draft, prompts[0], config)
    return interference, runs, uplink_by_rule


def run_latency_bench(config: LatencyBenchConfig) -> dict:
    from cloud_verifier.launcher import VerifierProcess
    from cloud_verifier.server import ServeConfig
    from specbridge.bench.latency_report import plot_latency, print_latency_tables, summarize
    from specbridge.model_zoo import prepare_pair

    pair = prepare_pair(config.pair)
    placement = config.placement
    prompts = choose_prompts(config.prompt_set, config.prompts)
    print(f"[latency] {config.pair}: {placement.describe()}", file=sys.stderr)
    serve_config = ServeConfig(target=str(pair.target_hf_dir), port=0, threads=placement.verifier_threads)
    verifier_process = VerifierProcess(serve_config, cpus=placement.verifier_cpus) if config.server is None else _Running(config.server)
    with verifier_process as verifier, placement.edge_pinned():
        draft = load_edge_draft(pair.draft_onnx_dir, variant=config.edge_variant, threads=placement.edge_threads)
        interference, runs, uplink_by_rule = uvloop.run(_bench(verifier.address, draft, prompts, config))
    report = {"pair": config.pair, "placement": placement.describe(), "interference": interference,
              "uplink_by_rule": uplink_by_rule, "config": _jsonable(asdict(config)), "prompts": prompts, "runs": runs}
    report["summary"] = summarize(runs)
    print_latency_tables(report)
    save_report(report, "latency", config.json, plot_latency, config.plot)
    return report


@dataclass(frozen=True)
class _Running:
    """A verifier someone else started, in the shape of a VerifierProcess."""

    address: str

    def __enter__(self) -> _Running:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def _jsonable(values: dict) -> dict:
    return {key: value.value if isinstance(value, StrEnum) else value for key, value in values.items()}
