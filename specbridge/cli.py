"""The `specbridge` command: one entry point, a subcommand per job, each a thin shell over a module.

Imports are lazy so that edge commands never import torch. A user mistake ends with one
readable line on stderr and exit status 2; only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from shared.errors import UserFacingError
from specbridge.cli_args import add_config_arguments, config_from_arguments

EXIT_USER_ERROR = 2
EDGE_SERVE = "edge-serve"
OWN_PACKAGES = {"specbridge", "shared", "edge_client", "cloud_verifier"}

# Before torch is imported: idle OpenMP workers must sleep, not spin, or a verifier's workers starve
# its own event loop and any edge client on the same cores (measured: 248 ms vs 3.7 ms between tokens).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class UserError(UserFacingError):
    """A mistake in the command line itself."""


# A user can fix these: each is shown as one line. Anything else is a bug and keeps its traceback.
USER_ERROR_TYPES = (UserFacingError, FileNotFoundError, NotADirectoryError, PermissionError)


def _models_prepare(args: argparse.Namespace) -> None:
    from specbridge.model_zoo import PAIR_NAMES, prepare_pair

    names = [n for n in PAIR_NAMES if not n.startswith("tiny")] if args.pair == "all" else [args.pair]
    for name in names:
        pair = prepare_pair(name, Path(args.out) if args.out else None, int8=args.int8)
        print(f"{pair.name}: draft ONNX {pair.draft_onnx_dir}  target {pair.target_hf_dir}")


def _models_list(args: argparse.Namespace) -> None:
    from specbridge.model_zoo import describe_pairs

    for row in describe_pairs():
        print("  ".join(f"{k}={v}" for k, v in row.items()))


def _models_measure(args: argparse.Namespace) -> None:
    import json

    from specbridge.model_zoo import prepare_pair
    from specbridge.pair_metrics import measure_pair
    from specbridge.prompts import HELD_OUT_PROMPTS

    report = measure_pair(prepare_pair(args.pair), HELD_OUT_PROMPTS[: args.prompts], draft_len=args.draft_len)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)


def _export_draft(args: argparse.Namespace) -> None:
    from specbridge.export import export_draft

    report = export_draft(Path(args.model), Path(args.out), int8=args.int8)
    print(report)


def _demo(args: argparse.Namespace) -> None:
    from specbridge.demo import run_demo

    run_demo(pair_name=args.pair, prompt=args.prompt, max_new_tokens=args.max_new_tokens, draft_len=args.draft_len,
             profile=args.profile)
    if args.openai:
        from specbridge.demo_openai import run_openai_demo

        run_openai_demo(pair_name=args.pair, prompt=args.prompt, max_new_tokens=args.max_new_tokens)


def _bench_draft(args: argparse.Namespace) -> None:
    from specbridge.bench.draft_latency import run_draft_latency
    from specbridge.model_zoo import prepare_pair

    onnx_dir = Path(args.draft) if args.draft else prepare_pair(args.pair).draft_onnx_dir
    run_draft_latency(onnx_dir, steps=args.steps, repeats=args.repeats, threads=args.threads,
                      json_out=Path(args.json) if args.json else None)


def _bench_acceptance(args: argparse.Namespace) -> None:
    from specbridge.bench.acceptance import AcceptanceBenchConfig, run_acceptance_bench

    run_acceptance_bench(config_from_arguments(AcceptanceBenchConfig, args))


def _bench_latency(args: argparse.Namespace) -> None:
    from specbridge.bench.latency import LatencyBenchConfig, run_latency_bench

    run_latency_bench(config_from_arguments(LatencyBenchConfig, args))


def _bench_throughput(args: argparse.Namespace) -> None:
    from specbridge.bench.throughput import ThroughputBenchConfig, run_throughput_bench

    run_throughput_bench(config_from_arguments(ThroughputBenchConfig, args))


def _bench_load(args: argparse.Namespace) -> None:
    from specbridge.bench.load import LoadBenchConfig, run_load_bench

    run_load_bench(config_from_arguments(LoadBenchConfig, args))


def _bench_http_overhead(args: argparse.Namespace) -> None:
    from specbridge.bench.http_overhead import HttpOverheadBenchConfig, run_http_overhead_bench

    run_http_overhead_bench(config_from_arguments(HttpOverheadBenchConfig, args))


def _bench_verify_cost(args: argparse.Namespace) -> None:
    from specbridge.bench.verify_cost import VerifyCostBenchConfig, run_verify_cost_bench

    run_verify_cost_bench(config_from_arguments(VerifyCostBenchConfig, args))


def _bench_engine(args: argparse.Namespace) -> None:
    from specbridge.bench.engine import EngineBenchConfig, run_engine_bench

    run_engine_bench(config_from_arguments(EngineBenchConfig, args))


def _bench_prefix_reuse(args: argparse.Namespace) -> None:
    from specbridge.bench.prefix_reuse import PrefixReuseBenchConfig, run_prefix_reuse_bench

    run_prefix_reuse_bench(config_from_arguments(PrefixReuseBenchConfig, args))


def _serve(args: argparse.Namespace) -> None:
    from cloud_verifier.server import ServeConfig, serve

    serve(config_from_arguments(ServeConfig, args))


def _edge(args: argparse.Namespace) -> None:
    from edge_client.cli import EdgeConfig, run_edge

    run_edge(config_from_arguments(EdgeConfig, args))


def _edge_serve(args: argparse.Namespace) -> None:
    from edge_client.openai_server import EdgeServeConfig, serve

    serve(config_from_arguments(EdgeServeConfig, args))


def _generate(args: argparse.Namespace) -> None:
    from edge_client.cli import GenerateConfig, run_generate

    run_generate(config_from_arguments(GenerateConfig, args))


def _netsim(args: argparse.Namespace) -> None:
    from specbridge.netsim import NetsimConfig, run_netsim

    run_netsim(config_from_arguments(NetsimConfig, args))


def _config_command(subparsers: argparse._SubParsersAction, name: str, help_text: str, module: str, config_name: str,
                    handler: Callable[[argparse.Namespace], None], prog: str | None = None) -> None:
    """A subcommand whose flags come from a config dataclass (imported only to build --help)."""
    import importlib

    parser = subparsers.add_parser(name, help=help_text, description=help_text, **({"prog": prog} if prog else {}))
    try:
        add_config_arguments(parser, getattr(importlib.import_module(module), config_name))
    except ImportError as error:
        missing = f"'{name}' is not available in this install ({error}); install specbridge with its extras"

        def unavailable(_args: argparse.Namespace) -> None:
            raise UserError(missing)

        parser.set_defaults(handler=unavailable)
        return
    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specbridge", description="Edge-cloud speculative decoding across tokenizers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="prepare and list model pairs").add_subparsers(dest="models_command", required=True)
    prepare = models.add_parser("prepare", help="install, convert and export a model pair into the cache",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prepare.add_argument("--pair", default="smollm2-gemma3", help="pair name, or 'all' (see `specbridge models list`)")
    prepare.add_argument("--out", default=None, help="cache directory (default: $SPECBRIDGE_CACHE or ~/.cache/specbridge/models)")
    prepare.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="also write the int8 draft")
    prepare.set_defaults(handler=_models_prepare)
    models.add_parser("list", help="the known pairs").set_defaults(handler=_models_list)
    measure = models.add_parser("measure", help="load time, memory, per-token latency and greedy agreement of a pair",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    measure.add_argument("--pair", default="smollm2-gemma3", help="model pair")
    measure.add_argument("--prompts", type=int, default=20, help="held-out prompts for the agreement probes")
    measure.add_argument("--draft-len", type=int, default=8, help="draft tokens per agreement probe")
    measure.add_argument("--json", default="results/pair_metrics.json", help="write the report here too")
    measure.set_defaults(handler=_models_measure)

    export = commands.add_parser("export-draft", help="export a Hugging Face causal LM to ONNX with a KV cache",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    export.add_argument("--model", required=True, help="Hugging Face model directory")
    export.add_argument("--out", required=True, help="output directory for the ONNX draft")
    export.add_argument("--int8", action=argparse.BooleanOptionalAction, default=False, help="also write an int8 variant")
    export.set_defaults(handler=_export_draft)

    demo = commands.add_parser("demo", help="the end-to-end job on the default pair", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--pair", default="smollm2-gemma3", help="model pair")
    demo.add_argument("--prompt", default="def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                      help="prompt text")
    demo.add_argument("--max-new-tokens", type=int, default=48, help="target tokens to generate")
    demo.add_argument("--draft-len", type=int, default=6, help="draft tokens per round of the fixed-length mode")
    demo.add_argument("--profile", default="wifi", help="simulated network between edge and verifier (see `specbridge netsim`)")
    demo.add_argument("--openai", action=argparse.BooleanOptionalAction, default=True,
                      help="end with the same generation through the openai package against `specbridge edge serve`")
    demo.set_defaults(handler=_demo)

    _config_command(commands, "serve", "run the cloud verifier (gRPC)", "cloud_verifier.server", "ServeConfig", _serve)
    _config_command(commands, "edge", "draft on this machine, verify on a server (`specbridge edge serve`: an "
                    "OpenAI-compatible endpoint)", "edge_client.cli", "EdgeConfig", _edge)
    _config_command(commands, EDGE_SERVE, "the edge as a local OpenAI-compatible HTTP endpoint: draft here, verify on a "
                    "server (also `specbridge edge serve`)", "edge_client.openai_server", "EdgeServeConfig", _edge_serve,
                    prog="specbridge edge serve")
    _config_command(commands, "generate", "target-only generation on a server (baseline)", "edge_client.cli", "GenerateConfig", _generate)
    _config_command(commands, "netsim", "a TCP proxy that adds network delay, jitter and bandwidth limits", "specbridge.netsim",
                    "NetsimConfig", _netsim)

    bench = commands.add_parser("bench", help="benchmarks (print a table, write JSON)").add_subparsers(dest="bench_command", required=True)
    draft = bench.add_parser("draft", help="edge draft step latency, fp32 and int8", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    draft.add_argument("--pair", default="smollm2-gemma3", help="model pair whose draft to time")
    draft.add_argument("--draft", default=None, help="ONNX draft directory (default: the pair's)")
    draft.add_argument("--steps", type=int, default=64, help="decode steps per repeat")
    draft.add_argument("--repeats", type=int, default=5, help="repeats (the median is reported)")
    draft.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    draft.add_argument("--json", default="results/draft_latency.json", help="write results here")
    draft.set_defaults(handler=_bench_draft)
    _config_command(bench, "acceptance", "acceptance of the core vs Hugging Face assisted generation",
                    "specbridge.bench.acceptance", "AcceptanceBenchConfig", _bench_acceptance)
    _config_command(bench, "throughput", "server throughput: speculative vs target-only, by client count",
                    "specbridge.bench.throughput", "ThroughputBenchConfig", _bench_throughput)
    _config_command(bench, "verify-cost", "one verification round's cost: output head on every position vs lazily",
                    "specbridge.bench.verify_cost", "VerifyCostBenchConfig", _bench_verify_cost)
    _config_command(bench, "engine", "one verifier step's time outside the model forward, by sessions and context",
                    "specbridge.bench.engine", "EngineBenchConfig", _bench_engine)
    _config_command(bench, "prefix-reuse", "a multi-turn chat with and without reusing finished sessions' KV cache",
                    "specbridge.bench.prefix_reuse", "PrefixReuseBenchConfig", _bench_prefix_reuse)
    _config_command(bench, "http-overhead", "per-request overhead of `specbridge edge serve` (HTTP) over the bare "
                    "Python API", "specbridge.bench.http_overhead", "HttpOverheadBenchConfig", _bench_http_overhead)
    _config_command(bench, "latency", "time to answer under network delay: cloud-only vs speculative, per profile",
                    "specbridge.bench.latency", "LatencyBenchConfig", _bench_latency)
    _config_command(bench, "load", "many concurrent edge sessions against one verifier: errors, latency, memory over time",
                    "specbridge.bench.load", "LoadBenchConfig", _bench_load)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `edge serve` reads as a sub-command of `edge`, but `edge` has required flags of its own, which argparse
    # would demand of `edge serve` too: the two words name the command registered as `edge-serve`.
    if argv[:2] == ["edge", "serve"]:
        argv = [EDGE_SERVE, *argv[2:]]
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("specbridge: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:
        package = (error.name or "").partition(".")[0]
        if not package or package in OWN_PACKAGES:
            raise
        # Each extra holds one side's imports (an edge install has no torch): name the missing piece, not a traceback.
        print(f"specbridge: error: this command needs the '{package}' package, which this install lacks; install "
              f"specbridge with the extra that provides it (verifier, export, models or bench)", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:  # noqa: BLE001 - narrowed just below to the user-error types
        if not isinstance(error, USER_ERROR_TYPES):
            raise
        print(f"specbridge: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
