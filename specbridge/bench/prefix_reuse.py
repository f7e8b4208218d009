"""`specbridge bench prefix-reuse`: what keeping finished sessions' KV saves a multi-turn conversation.

Plays one chat, turn by turn, through two verifier engines on the same loaded target: one keeps finished
sessions' caches (the default), one does not (`--no-prefix-reuse`). Each turn is a target-only greedy
session on the whole conversation so far (a plain-text transcript: the default target is a base model, with
no chat template), as a chat client sends it; the report gives, per turn, the prompt
tokens, the positions reused instead of prefilled, and the time to the first token with and without reuse.
Both engines must commit the same ids (reuse is exact): the report says whether they did.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cloud_verifier.engine import EngineLimits, VerifierEngine
from shared.decoding import DecodingConfig
from shared.errors import UserFacingError
from shared.wire import GenerationRequest
from specbridge.bench.report import finish_figure, pyplot, save_report

USER_TURNS = (
    "Explain in two sentences what a hash table is.",
    "How does it handle two keys that land in the same slot?",
    "Which is faster for lookups, that or a balanced tree, and why?",
    "Give a one-line Python example of the first one.",
    "Summarise our conversation in one sentence.",
    "Thanks. One more: what is a bloom filter?",
)


class PrefixReuseBenchConfigError(UserFacingError, ValueError):
    """A benchmark setting out of its valid range."""


@dataclass(frozen=True)
class PrefixReuseBenchConfig:
    pair: str = field(default="smollm2-gemma3", metadata={"help": "model pair whose target serves the chat (see `specbridge models list`)"})
    turns: int = field(default=4, metadata={"help": f"user turns of the conversation (at most {len(USER_TURNS)})"})
    max_new_tokens: int = field(default=32, metadata={"help": "target tokens each answer may take"})
    repeats: int = field(default=3, metadata={"help": "times the conversation is played (medians reported)"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (unset: torch's default)"})
    json: str = field(default="results/prefix_reuse.json", metadata={"help": "write results here"})
    plot: str = field(default="results/prefix_reuse.png", metadata={"help": "draw the plot here"})

    def __post_init__(self) -> None:
        if not 1 <= self.turns <= len(USER_TURNS):
            raise PrefixReuseBenchConfigError(f"--turns must lie in [1, {len(USER_TURNS)}], got {self.turns}")
        if self.max_new_tokens < 1 or self.repeats < 1:
            raise PrefixReuseBenchConfigError("--max-new-tokens and --repeats must be >= 1")


@dataclass(frozen=True)
class TurnTiming:
    prompt_tokens: int
    reused_tokens: int
    first_token_ms: float
    turn_ms: float
    output_ids: tuple[int, ...]


async def _turn(engine: VerifierEngine, transcript: str, max_new_tokens: int) -> TurnTiming:
    """One answer, as `Generate` runs it: open the session on the conversation, step until it finishes."""
    reused_before = engine.metrics.counts().prefix_cache_hit_tokens
    started = time.perf_counter()
    session = engine.generation_session(GenerationRequest(prompt=transcript, config=DecodingConfig(),
                                                          max_new_tokens=max_new_tokens))
    output: list[int] = []
    first_token_ms = 0.0
    with engine.sessions.hold(session):
        while not session.finished:
            step = await engine.generate_step(session)
            if not output:
                first_token_ms = (time.perf_counter() - started) * 1e3
            output.extend(step.token_ids)
    return TurnTiming(prompt_tokens=session.prompt_length,
                      reused_tokens=engine.metrics.counts().prefix_cache_hit_tokens - reused_before,
                      first_token_ms=first_token_ms, turn_ms=(time.perf_counter() - started) * 1e3, output_ids=tuple(output))


async def _conversation(engines: dict[str, VerifierEngine], config: PrefixReuseBenchConfig) -> list[dict]:
    """One play of the conversation; every turn runs on each engine (the reuse one's answer joins the history)."""
    history = ""
    turns = []
    vocab = engines["reuse"].vocab
    for number, question in enumerate(USER_TURNS[: config.turns], start=1):
        transcript = f"{history}User: {question}\nAssistant:"
        timed = {name: await _turn(engine, transcript, config.max_new_tokens) for name, engine in engines.items()}
        answer = vocab.tokenizer.decode(list(timed["reuse"].output_ids), skip_special_tokens=True)
        history = f"{transcript}{answer.rstrip()}\n"
        turns.append({"turn": number, "prompt_tokens": timed["reuse"].prompt_tokens,
                      "reused_tokens": timed["reuse"].reused_tokens,
                      "first_token_ms_reuse": timed["reuse"].first_token_ms,
                      "first_token_ms_no_reuse": timed["no_reuse"].first_token_ms,
                      "turn_ms_reuse": timed["reuse"].turn_ms, "turn_ms_no_reuse": timed["no_reuse"].turn_ms,
                      "identical": timed["reuse"].output_ids == timed["no_reuse"].output_ids})
        print(f"[prefix-reuse] turn {number}: {timed['reuse'].prompt_tokens} prompt tokens, "
              f"{timed['reuse'].reused_tokens} reused", file=sys.stderr)
    return turns


def run_prefix_reuse_bench(config: PrefixReuseBenchConfig) -> dict:
    import torch

    from specbridge.loading import load_target
    from specbridge.model_zoo import prepare_pair

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    pair = prepare_pair(config.pair)
    target, vocab = load_target(pair.target_hf_dir)
    name = Path(pair.target_hf_dir).parent.name
    plays = []
    for _ in range(config.repeats):  # fresh engines each play (on the one loaded target): no cache from the last
        engines = {"reuse": VerifierEngine(target, vocab, name, EngineLimits()),
                   "no_reuse": VerifierEngine(target, vocab, name, EngineLimits(), prefix_reuse=False)}
        try:
            plays.append(asyncio.run(_conversation(engines, config)))
        finally:
            for engine in engines.values():
                engine.close()
    rows = []
    for turn_plays in zip(*plays):
        row = {key: statistics.median(play[key] for play in turn_plays) for key in turn_plays[0]
               if key not in ("turn", "identical")}
        rows.append({"turn": turn_plays[0]["turn"], **row, "identical": all(play["identical"] for play in turn_plays)})
    report = {"pair": config.pair, "target": name, "threads": torch.get_num_threads(), "config": asdict(config), "rows": rows}
    _print_table(report)
    save_report(report, "prefix-reuse", config.json, plot_prefix_reuse, config.plot)
    return report


def _print_table(report: dict) -> None:
    print(f"{report['target']}: one chat, turn by turn, target-only greedy, {report['threads']} thread(s); "
          f"medians of {report['config']['repeats']} plays")
    header = (f"{'turn':>4} {'prompt tok':>10} {'reused':>7} {'prefilled':>9} {'TTFT ms reuse':>13} "
              f"{'TTFT ms none':>12} {'speedup':>7} {'identical':>9}")
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        speedup = row["first_token_ms_no_reuse"] / row["first_token_ms_reuse"] if row["first_token_ms_reuse"] else 0.0
        print(f"{row['turn']:>4} {row['prompt_tokens']:>10.0f} {row['reused_tokens']:>7.0f} "
              f"{row['prompt_tokens'] - row['reused_tokens']:>9.0f} {row['first_token_ms_reuse']:>13.1f} "
              f"{row['first_token_ms_no_reuse']:>12.1f} {speedup:>6.2f}x {'yes' if row['identical'] else 'NO':>9}")


def plot_prefix_reuse(report: dict, path: Path) -> None:
    """Per turn: time to first token with and without reuse, and the prompt tokens prefilled."""
    plt = pyplot()
    rows = report["rows"]
    turns = [row["turn"] for row in rows]
    figure, (timing, tokens) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    timing.bar([t - width / 2 for t in turns], [row["first_token_ms_no_reuse"] for row in rows], width, label="no reuse")
    timing.bar([t + width / 2 for t in turns], [row["first_token_ms_reuse"] for row in rows], width, label="prefix reuse")
    timing.set(xlabel="turn", ylabel="time to first token, ms (median)", title="time to first token")
    tokens.bar(turns, [row["prompt_tokens"] - row["reused_tokens"] for row in rows], label="prefilled")
    tokens.bar(turns, [row["reused_tokens"] for row in rows],
               bottom=[row["prompt_tokens"] - row["reused_tokens"] for row in rows], label="reused")
    tokens.set(xlabel="turn", ylabel="prompt tokens", title="prompt tokens: prefilled vs reused")
    for axis in (timing, tokens):
        axis.set_xticks(turns)
    finish_figure(figure, [timing, tokens], f"{report['target']}, {report['threads']} thread(s)", path)
