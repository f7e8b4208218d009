"""`specbridge bench verify-cost`: what one verification round costs the verifier, with the output head run on
every fed position (as it used to be) or only on the rows the acceptance rules read (the lazy head).

Loads the pair's target on `--threads` CPU threads with a realistic context in each session's cache, then times
one batched target forward plus the greedy decisions (the scheduler's step) for m proposed tokens of which 0,
m/2 or m are accepted, and the output head alone by rows; prints a table, writes JSON, plots from that JSON.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cloud_verifier.lazy_head import LAZY_FROM_ROWS, compute_rows
from cloud_verifier.session import PlannedRound, ProposalLimits, VerifierSession, decide_together
from cloud_verifier.target import RowCache, TargetModel
from shared.decoding import DecodingConfig
from shared.errors import UserFacingError
from shared.vocab import Vocab
from specbridge.bench.report import save_report

ALL_ROWS = "all_rows"  # the old behaviour: the head over every fed position, before the rules run
LAZY = "lazy"
MIXED = "mixed"
# Share of served rounds that reject x_1 (acceptance is bimodal): the mixed batch has this many such sessions.
FIRST_REJECTED_SHARE = 0.38
HEAD_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class VerifyCostBenchConfigError(UserFacingError, ValueError):
    """A benchmark setting out of its valid range."""


@dataclass(frozen=True)
class VerifyCostBenchConfig:
    pair: str = field(default="smollm2-gemma3", metadata={"help": "model pair whose target to time (see `specbridge models list`)"})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads for the target"})
    context_tokens: int = field(default=100, metadata={"help": "target tokens of context in each cache before a round"})
    proposal_lengths: tuple[int, ...] = field(default=(0, 1, 2, 4, 6, 8),
                                              metadata={"help": "proposed target tokens per round (0: a target-only step)"})
    sessions: tuple[int, ...] = field(default=(1, 4, 16), metadata={"help": "sessions verified together in one forward"})
    repeats: int = field(default=7, metadata={"help": "timed runs per measurement (the median is reported)"})
    first_round: bool = field(default=True, metadata={
        "help": "also time one session's first round (its whole context uncached) at the longest proposal"})
    json: str = field(default="results/verify_cost.json", metadata={"help": "write results here"})
    plot: str = field(default="results/verify_cost.png", metadata={"help": "draw the plot here"})

    def __post_init__(self) -> None:
        if not self.proposal_lengths or min(self.proposal_lengths) < 0:
            raise VerifyCostBenchConfigError(f"--proposal-lengths must be counts >= 0, got {self.proposal_lengths}")
        if not self.sessions or min(self.sessions) < 1:
            raise VerifyCostBenchConfigError(f"--sessions must be counts >= 1, got {self.sessions}")
        if self.context_tokens < 2:
            raise VerifyCostBenchConfigError(f"--context-tokens must be >= 2, got {self.context_tokens}")
        for name in ("threads", "repeats"):
            if getattr(self, name) < 1:
                raise VerifyCostBenchConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class _Round:
    """One timed step: a round per session, `cached` context tokens in each cache, the rest fed with the proposal."""

    key: str  # the report row it belongs to
    cached: int
    proposed: int
    accepted: tuple[int, ...]  # per session: how many proposed tokens are the target's own greedy ones
    head: str  # ALL_ROWS or LAZY
    level: str  # the report column: ALL_ROWS, an accepted count, or MIXED

    @property
    def label(self) -> str:
        return f"{self.key}/{self.level}"


def acceptance_levels(proposed: int) -> list[int]:
    """Accepted-prefix lengths timed for a proposal of `proposed` tokens: none, half, all."""
    return sorted({0, proposed // 2, proposed})


def mixed_acceptance(sessions: int, proposed: int) -> tuple[int, ...]:
    """A batch as served: FIRST_REJECTED_SHARE of its rounds reject x_1, the others accept half their proposal."""
    rejected = round(FIRST_REJECTED_SHARE * sessions)
    return (0,) * rejected + (max(1, proposed // 2),) * (sessions - rejected)


def _proposal(continuation: Sequence[int], proposed: int, accepted: int, vocab_size: int) -> tuple[int, ...]:
    """The target's own greedy tokens, with the one at `accepted` (if any) replaced so that it is rejected."""
    tokens = list(continuation[:proposed])
    if accepted < proposed:
        tokens[accepted] = (tokens[accepted] + 1) % vocab_size
    return tuple(tokens)


def _rounds(config: VerifyCostBenchConfig) -> list[_Round]:
    steady = config.context_tokens - 1  # the last committed token is fed with the proposal, as after any round
    shapes = [(f"{sessions}x{proposed}", sessions, steady, proposed)
              for sessions in config.sessions for proposed in config.proposal_lengths]
    if config.first_round:
        shapes.append(("first", 1, 0, max(config.proposal_lengths)))
    rounds = []
    for key, sessions, cached, proposed in shapes:
        rounds.append(_Round(key, cached, proposed, (0,) * sessions, ALL_ROWS, ALL_ROWS))
        rounds += [_Round(key, cached, proposed, (accepted,) * sessions, LAZY, str(accepted))
                   for accepted in acceptance_levels(proposed)]
        mixed = mixed_acceptance(sessions, proposed)
        if proposed and len(set(mixed)) == 2:
            rounds.append(_Round(key, cached, proposed, mixed, LAZY, MIXED))
    return rounds


def _time_step(target: TargetModel, vocab: Vocab, context_ids: Sequence[int], cache: RowCache, continuation: Sequence[int],
               timed: _Round) -> tuple[float, list[int]]:
    """(milliseconds for the forward and the decisions, tokens each session accepted), on fresh sessions."""
    steps = []
    for accepted in timed.accepted:
        proposal = _proposal(continuation, timed.proposed, accepted, target.vocab_size)
        session = VerifierSession(vocab, list(context_ids), DecodingConfig(), max_new_tokens=timed.proposed + 1,
                                  limits=ProposalLimits(max_draft_tokens=max(1, timed.proposed)))
        session.cache = cache.copy() if timed.cached else RowCache()
        steps.append((session, PlannedRound(proxy_ids=proposal, feed_ids=tuple(context_ids[timed.cached :]) + proposal,
                                            draft_positions=tuple(() for _ in proposal), proposal_probs=None, align_us=0.0)))
    started = time.perf_counter()
    feeds = target.forward([(session.cache, planned.feed_ids) for session, planned in steps])
    if timed.head == ALL_ROWS:
        compute_rows([(feed_logits, 0, len(feed_logits)) for feed_logits in feeds])
    outcomes = decide_together([(session, planned, feed_logits) for (session, planned), feed_logits in zip(steps, feeds)])
    elapsed_ms = (time.perf_counter() - started) * 1e3
    failed = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    if failed:
        raise failed[0]
    return elapsed_ms, [len(outcome.accepted_ids) for outcome in outcomes]


def _head_ms(target: TargetModel, rows: int, repeats: int) -> float:
    hidden = torch.randn(rows, target.config.hidden_size, dtype=target.dtype, device=target.device)
    target.logits(hidden)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.logits(hidden)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def run_verify_cost_bench(config: VerifyCostBenchConfig) -> dict:
    from specbridge.loading import load_target
    from specbridge.model_zoo import prepare_pair
    from specbridge.prompts import HELD_OUT_PROMPTS

    torch.set_num_threads(config.threads)
    pair = prepare_pair(config.pair)
    target, vocab = load_target(pair.target_hf_dir)
    context_ids = list(vocab.tokenizer("\n\n".join(HELD_OUT_PROMPTS))["input_ids"])[: config.context_tokens]
    if len(context_ids) < config.context_tokens:
        raise VerifyCostBenchConfigError(f"the held-out prompts give only {len(context_ids)} target tokens of context")
    longest = max(config.proposal_lengths)
    inputs = torch.tensor([context_ids], device=target.device)
    with torch.inference_mode():
        continuation = target.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=longest + 1,
                                             min_new_tokens=longest + 1, do_sample=False)[0, len(context_ids):].tolist()
    cache = RowCache()
    target.forward([(cache, context_ids[:-1])])
    rounds = _rounds(config)
    times: dict[str, list[float]] = {timed.label: [] for timed in rounds}
    accepted: dict[str, list[int]] = {}
    for repeat in range(config.repeats + 1):  # the first pass warms up, untimed; each pass runs every round once
        for timed in rounds:
            elapsed_ms, accepted[timed.label] = _time_step(target, vocab, context_ids, cache, continuation, timed)
            if repeat:
                times[timed.label].append(elapsed_ms)
        print(f"[verify-cost] pass {repeat}/{config.repeats} done" + ("" if repeat else " (warm-up)"), file=sys.stderr)
    median = {label: statistics.median(values) for label, values in times.items()}
    head_ms = {str(rows): _head_ms(target, rows, config.repeats)
               for rows in HEAD_ROWS if rows <= max(config.sessions) * (longest + 1)}
    print("[verify-cost] output head timed by rows", file=sys.stderr)
    report = {
        "pair": config.pair,
        "target": Path(pair.target_hf_dir).parent.name,
        "threads": config.threads,
        "context_tokens": config.context_tokens,
        "lazy_from_rows": LAZY_FROM_ROWS,
        "config": asdict(config),
        "head_ms": head_ms,
        "rounds": [_report_row([timed for timed in rounds if timed.key == key], median, accepted)
                   for key in dict.fromkeys(timed.key for timed in rounds)],
    }
    _print_table(report)
    save_report(report, "verify-cost", config.json, plot_verify_cost, config.plot)
    return report


def _report_row(rounds: list[_Round], median: dict[str, float], accepted: dict[str, list[int]]) -> dict:
    """One (sessions, m) shape: the median of each head variant, and the tokens each session accepted in it."""
    first = rounds[0]
    lazy = [timed for timed in rounds if timed.head == LAZY]
    return {"round": "steady" if first.cached else "first", "sessions": len(first.accepted), "m": first.proposed,
            ALL_ROWS + "_ms": median[first.label],
            "lazy_ms": {timed.level: median[timed.label] for timed in lazy},
            "accepted": {timed.level: accepted[timed.label] for timed in lazy}}


def _lazy_at_none_half_all(row: dict) -> list[float]:
    return [row["lazy_ms"][str(accepted)] for accepted in (0, row["m"] // 2, row["m"])]


def _print_table(report: dict) -> None:
    print(f"{report['target']}: one verification step (batched target forward + greedy decisions), median ms, "
          f"{report['threads']} thread(s), {report['context_tokens']}-token context; the lazy head computes first "
          f"rows alone from {report['lazy_from_rows']} rows in a step")
    header = (f"{'round':>6} {'sessions':>8} {'m':>3} {'all rows':>9} {'lazy a=0':>9} {'a=m/2':>8} {'a=m':>8} {'mixed':>8}   "
              f"lazy saves at a = 0 / m/2 / m / mixed")
    print(header)
    print("-" * len(header))
    for row in report["rounds"]:
        old, lazy = row[ALL_ROWS + "_ms"], _lazy_at_none_half_all(row)
        mixed = row["lazy_ms"].get(MIXED)
        saved = " / ".join(f"{(1 - ms / old) * 100:.0f}%" for ms in lazy + ([mixed] if mixed else []))
        print(f"{row['round']:>6} {row['sessions']:>8} {row['m']:>3} {old:>9.1f} {lazy[0]:>9.1f} {lazy[1]:>8.1f} "
              f"{lazy[2]:>8.1f} {f'{mixed:.1f}' if mixed else '-':>8}   {saved}")
    print(f"mixed: {FIRST_REJECTED_SHARE:.0%} of a batch's rounds reject x_1, the others accept m/2")
    print("output head alone, median ms by rows: " + ", ".join(f"{rows}: {ms:.1f}" for rows, ms in report["head_ms"].items()))


def plot_verify_cost(report: dict, path: Path) -> None:
    """Per session count: step time against proposal length, all rows vs lazy at each acceptance; head time by rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steady = [row for row in report["rounds"] if row["round"] == "steady"]
    counts = sorted({row["sessions"] for row in steady})
    figure, axes = plt.subplots(1, len(counts) + 1, figsize=(4.5 * (len(counts) + 1), 4), squeeze=False)
    for axis, sessions in zip(axes[0], counts):
        rows = [row for row in steady if row["sessions"] == sessions]
        proposed = [row["m"] for row in rows]
        axis.plot(proposed, [row[ALL_ROWS + "_ms"] for row in rows], marker="o", color="black", label="head on every fed position")
        lazy = [_lazy_at_none_half_all(row) for row in rows]
        for pick, name in enumerate(("lazy, none accepted", "lazy, half accepted", "lazy, all accepted")):
            axis.plot(proposed, [values[pick] for values in lazy], marker="o", label=name)
        mixed = [(row["m"], row["lazy_ms"][MIXED]) for row in rows if MIXED in row["lazy_ms"]]
        if mixed:
            axis.plot(*zip(*mixed), marker="s", linestyle="--", label=f"lazy, {FIRST_REJECTED_SHARE:.0%} reject x_1")
        axis.set(xlabel="proposed tokens m", ylabel="ms per step (median)", title=f"{sessions} session(s) per forward")
        axis.legend(fontsize="small")
    head_axis = axes[0][-1]
    head_axis.plot([int(rows) for rows in report["head_ms"]], list(report["head_ms"].values()), marker="o")
    head_axis.set(xlabel="rows through the head in one call", ylabel="ms (median)", title="output head alone")
    for axis in axes[0]:
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{report['target']}, {report['threads']} thread(s), {report['context_tokens']}-token context")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
