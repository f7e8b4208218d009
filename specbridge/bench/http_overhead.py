"""`specbridge bench http-overhead`: what the OpenAI-compatible HTTP layer (`specbridge edge serve`) adds to each
request over the bare Python API, on the same verifier, prompts and settings.

Starts the verifier (a child process on its CPUs) and `specbridge edge serve` (a child process on the edge's
CPUs, as a user starts it); for every prompt and repeat it runs the same greedy generation three ways, in
turn: the bare API (`Edge.generate`, in this process), HTTP without streaming and HTTP with streaming (both
through `httpx`, as an OpenAI client would). The overhead is the median HTTP wall time minus the median bare
one, per prompt. Prints a table, writes JSON.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

import specbridge
from edge_client.api import Edge, Generation
from edge_client.launcher import EdgeServeProcess
from edge_client.openai_server import EdgeServeConfig
from shared.errors import UserFacingError
from shared.event_loop import run
from specbridge.bench.report import save_report
from specbridge.placement import PlacementSettings

BARE = "bare_api"
HTTP = "http"
HTTP_STREAM = "http_stream"
MODES = (BARE, HTTP, HTTP_STREAM)
MODEL = "bench"


class HttpOverheadBenchConfigError(UserFacingError, ValueError):
    """A benchmark setting out of its valid range."""


@dataclass(frozen=True)
class HttpOverheadBenchConfig(PlacementSettings):
    pair: str = field(default="smollm2-gemma3", metadata={"help": "model pair (see `specbridge models list`)"})
    prompts: int = field(default=4, metadata={"help": "held-out prompts, each measured every way"})
    max_new_tokens: int = field(default=24, metadata={"help": "target tokens per request"})
    draft_len: int = field(default=4, metadata={"help": "draft tokens per round (fixed, so every way runs the same rounds)"})
    repeats: int = field(default=5, metadata={"help": "requests per prompt and way (the median is reported)"})
    json: str = field(default="results/http_overhead.json", metadata={"help": "write results here"})

    def __post_init__(self) -> None:
        for name in ("prompts", "max_new_tokens", "draft_len", "repeats"):
            if getattr(self, name) < 1:
                raise HttpOverheadBenchConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        super().__post_init__()


@dataclass(frozen=True)
class Timing:
    wall_ms: float
    first_text_ms: float  # time to the first text (the whole answer where nothing streams)
    text: str


async def _bare(edge: Edge, prompt: str, config: HttpOverheadBenchConfig) -> Timing:
    request = Generation(prompt=prompt, max_tokens=config.max_new_tokens, draft_len=config.draft_len)
    arrivals: list[float] = []
    started = time.perf_counter()
    result = await edge.generate(request, lambda _: arrivals.append(time.perf_counter()))
    ended = time.perf_counter()
    return Timing((ended - started) * 1e3, ((arrivals[0] if arrivals else ended) - started) * 1e3, result.text)


async def _http(client: httpx.AsyncClient, prompt: str, config: HttpOverheadBenchConfig) -> Timing:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": config.max_new_tokens, "temperature": 0}
    started = time.perf_counter()
    response = await client.post("/completions", json=body)
    response.raise_for_status()
    wall_ms = (time.perf_counter() - started) * 1e3
    return Timing(wall_ms, wall_ms, response.json()["choices"][0]["text"])


async def _http_stream(client: httpx.AsyncClient, prompt: str, config: HttpOverheadBenchConfig) -> Timing:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": config.max_new_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first_ms, texts = None, []
    async with client.stream("POST", "/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line.removeprefix("data: "))["choices"][0]["text"]
            if text and first_ms is None:
                first_ms = (time.perf_counter() - started) * 1e3
            texts.append(text)
    wall_ms = (time.perf_counter() - started) * 1e3
    return Timing(wall_ms, wall_ms if first_ms is None else first_ms, "".join(texts))


async def _bench(edge: Edge, base_url: str, prompts: list[str],
                 config: HttpOverheadBenchConfig) -> dict[str, dict[str, list[Timing]]]:
    timings = {prompt: {mode: [] for mode in MODES} for prompt in prompts}
    async with edge, httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        ways = {BARE: lambda prompt: _bare(edge, prompt, config), HTTP: lambda prompt: _http(client, prompt, config),
                HTTP_STREAM: lambda prompt: _http_stream(client, prompt, config)}
        for way in ways.values():  # warm-up: first-request costs (connections, caches) are not per-request overhead
            await way(prompts[0])
        for repeat in range(config.repeats):
            for prompt in prompts:
                for mode in MODES if repeat % 2 == 0 else reversed(MODES):  # alternate the order against drift
                    timings[prompt][mode].append(await ways[mode](prompt))
            print(f"[http-overhead] repeat {repeat + 1}/{config.repeats}", file=sys.stderr)
    return timings


def summarize(timings: dict[str, dict[str, list[Timing]]]) -> dict:
    """Per prompt: each way's median wall time and time to first text; the HTTP ways' overhead over the bare API."""
    rows = []
    for prompt, by_mode in timings.items():
        row = {"prompt": prompt[:40], "identical_text": len({t.text for ts in by_mode.values() for t in ts}) == 1}
        for mode, mode_timings in by_mode.items():
            row[f"{mode}_wall_ms_p50"] = float(np.median([t.wall_ms for t in mode_timings]))
            row[f"{mode}_first_text_ms_p50"] = float(np.median([t.first_text_ms for t in mode_timings]))
        for mode in (HTTP, HTTP_STREAM):
            row[f"{mode}_overhead_ms"] = row[f"{mode}_wall_ms_p50"] - row[f"{BARE}_wall_ms_p50"]
        row[f"{HTTP_STREAM}_first_text_overhead_ms"] = (row[f"{HTTP_STREAM}_first_text_ms_p50"]
                                                        - row[f"{BARE}_first_text_ms_p50"])
        rows.append(row)
    overall = {key: float(np.median([row[key] for row in rows])) for key in rows[0] if key.endswith("_ms") or "_ms_" in key}
    overall["identical_text"] = all(row["identical_text"] for row in rows)
    return {"per_prompt": rows, "median_over_prompts": overall}


def run_http_overhead_bench(config: HttpOverheadBenchConfig) -> dict:
    from cloud_verifier.launcher import VerifierProcess
    from cloud_verifier.server import ServeConfig
    from specbridge.model_zoo import prepare_pair
    from specbridge.prompts import HELD_OUT_PROMPTS

    pair = prepare_pair(config.pair)
    prompts = [HELD_OUT_PROMPTS[index % len(HELD_OUT_PROMPTS)] for index in range(config.prompts)]
    placement = config.placement
    note = f"{placement.describe()}; edge serve and the bare API each load the draft; loopback"
    print(f"[http-overhead] {config.pair}: {note}", file=sys.stderr)
    serve_config = ServeConfig(target=str(pair.target_hf_dir), port=0, threads=placement.verifier_threads)
    with VerifierProcess(serve_config, cpus=placement.verifier_cpus) as verifier:
        edge_config = EdgeServeConfig(server=verifier.address, draft=str(pair.draft_onnx_dir), port=0, model_name=MODEL,
                                      draft_len=str(config.draft_len), threads=placement.edge_threads)
        with EdgeServeProcess(edge_config, cpus=placement.edge_cpus) as edge_server, placement.edge_pinned():
            edge = specbridge.connect(verifier.address, pair.draft_onnx_dir, threads=placement.edge_threads)
            timings = run(_bench(edge, edge_server.base_url, prompts, config))
    report = {"pair": config.pair, "placement": placement.describe(), "note": note, "config": asdict(config),
              **summarize(timings)}
    _print_table(report)
    save_report(report, "http-overhead", config.json)
    return report


def _print_table(report: dict) -> None:
    header = (f"{'prompt':<42}{'bare ms':>9}{'http ms':>9}{'+ms':>7}{'stream ms':>11}{'+ms':>7}"
              f"{'first text bare/stream ms':>27}{'same text':>11}")
    print(f"{report['pair']}: {report['note']}")
    print(header)
    print("-" * len(header))
    for row in [*report["per_prompt"], {"prompt": "median over prompts", **report["median_over_prompts"]}]:
        print(f"{row['prompt'].replace(chr(10), ' '):<42}{row['bare_api_wall_ms_p50']:>9.1f}{row['http_wall_ms_p50']:>9.1f}"
              f"{row['http_overhead_ms']:>+7.1f}{row['http_stream_wall_ms_p50']:>11.1f}{row['http_stream_overhead_ms']:>+7.1f}"
              f"{row['bare_api_first_text_ms_p50']:>14.1f}/{row['http_stream_first_text_ms_p50']:<12.1f}"
              f"{'yes' if row['identical_text'] else 'NO':>11}")
