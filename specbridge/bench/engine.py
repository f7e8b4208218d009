"""`specbridge bench engine`: what a verifier step costs outside the model's own computation, by sessions and context.

Loads the pair's target, prefills one context per length and gives every session its own copy, then times
steady verification steps (each session feeds one committed token and a proposal, the head computes the
rows greedy reads, argmax) and, inside each, the decoder's forward and the output head. What is left is the
step's KV bookkeeping and batching (outside the forward). Also reports resident memory per live session.
Runs against any verifier version with `TargetModel.forward([(RowCache, ids)])`, so before/after compare.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from cloud_verifier.lazy_head import compute_rows
from cloud_verifier.target import RowCache, TargetModel
from shared.errors import UserFacingError
from specbridge.bench.report import finish_figure, pyplot, save_report


class EngineBenchConfigError(UserFacingError, ValueError):
    """A benchmark setting out of its valid range."""


@dataclass(frozen=True)
class EngineBenchConfig:
    pair: str = field(default="smollm2-gemma3", metadata={"help": "model pair whose target to time (see `specbridge models list`)"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (unset: torch's default)"})
    contexts: tuple[int, ...] = field(default=(128, 1024, 4096), metadata={"help": "target tokens in each session's cache"})
    sessions: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "sessions verified together in one forward"})
    feed_tokens: int = field(default=5, metadata={"help": "tokens each session feeds a step (1 committed + a proposal)"})
    max_cached_tokens: int = field(default=40_000, metadata={
        "help": "skip shapes whose sessions hold more cached tokens in all (sessions x context) than this"})
    repeats: int = field(default=3, metadata={"help": "timed steps per shape (the median is reported), after one warm-up"})
    json: str = field(default="results/engine.json", metadata={"help": "write results here"})
    plot: str = field(default="results/engine.png", metadata={"help": "draw the plot here"})

    def __post_init__(self) -> None:
        if not self.contexts or min(self.contexts) < 2:
            raise EngineBenchConfigError(f"--contexts must be token counts >= 2, got {self.contexts}")
        if not self.sessions or min(self.sessions) < 1:
            raise EngineBenchConfigError(f"--sessions must be counts >= 1, got {self.sessions}")
        if self.feed_tokens < 1 or self.repeats < 1:
            raise EngineBenchConfigError("--feed-tokens and --repeats must be >= 1")


class _ForwardTimer:
    """Wall time spent inside the decoder's forward, accumulated by hooks."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._started = 0.0
        decoder.register_forward_pre_hook(self._enter)
        decoder.register_forward_hook(self._leave)

    def _enter(self, *_: object) -> None:
        self._started = time.perf_counter()

    def _leave(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._started


def _new_cache(capacity_tokens: int) -> RowCache:
    try:  # a verifier that reserves each session's positions up front
        return RowCache(capacity_tokens=capacity_tokens)
    except TypeError:  # the earlier layout, grown by concatenation
        return RowCache()


def _copy(cache: RowCache) -> RowCache:
    return cache.copy() if hasattr(cache, "copy") else RowCache(list(cache.layers))


def _step(target: TargetModel, caches: list[RowCache], feeds: list[list[int]], timer: _ForwardTimer) -> dict[str, float]:
    """One step's milliseconds: whole, decoder forward, output head; every cache is cropped back afterwards."""
    lengths = [cache.length for cache in caches]
    timer.seconds = 0.0
    started = time.perf_counter()
    outputs = target.forward(list(zip(caches, feeds)))
    head_started = time.perf_counter()
    compute_rows([(output, 0, len(output)) for output in outputs])
    [int(torch.argmax(output[position])) for output in outputs for position in range(len(output))]
    ended = time.perf_counter()
    for cache, length in zip(caches, lengths):
        cache.crop(length)
    return {"step_ms": (ended - started) * 1e3, "forward_ms": timer.seconds * 1e3, "head_ms": (ended - head_started) * 1e3}


def run_engine_bench(config: EngineBenchConfig) -> dict:
    from specbridge.loading import load_target
    from specbridge.model_zoo import prepare_pair

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    pair = prepare_pair(config.pair)
    target, _ = load_target(pair.target_hf_dir)
    timer = _ForwardTimer(target.decoder)
    generator = torch.Generator().manual_seed(0)
    process = psutil.Process()
    rows = []
    for context in config.contexts:
        ids = torch.randint(0, target.vocab_size, (context,), generator=generator).tolist()
        prefilled = _new_cache(context + config.feed_tokens)
        target.forward([(prefilled, ids)])
        for count in config.sessions:
            if count * context > config.max_cached_tokens:
                print(f"[engine] skipping {count} sessions x {context} tokens (--max-cached-tokens)", file=sys.stderr)
                continue
            rss_before = process.memory_info().rss
            caches = [_copy(prefilled) for _ in range(count)]
            feeds = [torch.randint(0, target.vocab_size, (config.feed_tokens,), generator=generator).tolist()
                     for _ in range(count)]
            timings = [_step(target, caches, feeds, timer) for _ in range(config.repeats + 1)][1:]
            rss_per_session = (process.memory_info().rss - rss_before) / count
            median = {key: statistics.median(t[key] for t in timings) for key in timings[0]}
            outside_ms = median["step_ms"] - median["forward_ms"] - median["head_ms"]
            rows.append({"sessions": count, "context": context, **median, "outside_ms": outside_ms,
                         "outside_share": outside_ms / median["step_ms"], "rss_mib_per_session": rss_per_session / 2**20})
            print(f"[engine] {count} sessions x {context} tokens: {median['step_ms']:.1f} ms a step", file=sys.stderr)
            del caches
    report = {"pair": config.pair, "target": Path(pair.target_hf_dir).parent.name, "threads": torch.get_num_threads(),
              "config": asdict(config), "rows": rows}
    _print_table(report)
    save_report(report, "engine", config.json, plot_engine, config.plot)
    return report


def _print_table(report: dict) -> None:
    print(f"{report['target']}: one verification step, median ms, {report['threads']} thread(s), "
          f"{report['config']['feed_tokens']} tokens fed per session; outside = step - decoder forward - head")
    header = f"{'sessions':>8} {'context':>8} {'step':>9} {'forward':>9} {'head':>8} {'outside':>8} {'share':>6} {'MiB/session':>12}"
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        print(f"{row['sessions']:>8} {row['context']:>8} {row['step_ms']:>9.1f} {row['forward_ms']:>9.1f} {row['head_ms']:>8.1f} "
              f"{row['outside_ms']:>8.1f} {row['outside_share']:>6.1%} {row['rss_mib_per_session']:>12.1f}")


def plot_engine(report: dict, path: Path) -> None:
    """Per context: step time split into decoder forward, head and outside, by session count."""
    plt = pyplot()
    contexts = sorted({row["context"] for row in report["rows"]})
    figure, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 4), squeeze=False)
    for axis, context in zip(axes[0], contexts):
        rows = [row for row in report["rows"] if row["context"] == context]
        labels = [str(row["sessions"]) for row in rows]
        bottom = [0.0] * len(rows)
        for key, name in (("forward_ms", "decoder forward"), ("head_ms", "output head"), ("outside_ms", "outside the forward")):
            values = [max(0.0, row[key]) for row in rows]
            axis.bar(labels, values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values)]
        axis.set(xlabel="sessions per step", ylabel="ms per step (median)", title=f"{context}-token context")
    finish_figure(figure, list(axes[0]), f"{report['target']}, {report['threads']} thread(s)", path)
