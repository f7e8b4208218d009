"""`make demo`: the main job end to end on the real pair (SmolLM2-135M draft, Gemma-3-270M target).

Shows the ONNX draft alone, then starts the verifier (`specbridge serve`, a child process pinned
to its own CPU) behind a simulated network (`specbridge netsim`, the wifi profile by default),
streams a speculative generation from the edge client over gRPC, and ends with one table:
cloud-only vs speculative vs speculative with draft-ahead at that profile, checked token for token.
"""

from __future__ import annotations

import sys
import time

import uvloop

from shared.decoding import DecodingConfig

GREEDY = DecodingConfig()
DEMO_MODES = "speculative,speculative_ahead"


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_demo(pair_name: str, prompt: str, max_new_tokens: int, draft_len: int, profile: str) -> None:
    from cloud_verifier.launcher import VerifierProcess
    from cloud_verifier.server import ServeConfig
    from edge_client.client import VerifierClient, load_edge_draft
    from edge_client.drafter import Drafter
    from specbridge.bench.latency import LatencyBenchConfig, profile_runs
    from specbridge.bench.latency_report import summarize
    from specbridge.model_zoo import prepare_pair
    from specbridge.netsim import PROFILES, DelayProxy

    config = LatencyBenchConfig(pair=pair_name, profiles=profile, modes=DEMO_MODES, prompts=1, repeats=1,
                                max_new_tokens=max_new_tokens, draft_len=draft_len)
    placement = config.placement
    pair = prepare_pair(pair_name)
    print(f"== pair {pair.name}\n   edge draft (onnxruntime): {pair.draft_onnx_dir}\n   verifier target (torch): {pair.target_hf_dir}")
    print(f"== placement: {placement.describe()}")
    print(f"== prompt\n{prompt}")

    with placement.edge_pinned():
        draft = load_edge_draft(pair.draft_onnx_dir, threads=placement.edge_threads)
        drafter = Drafter(draft.runtime, draft.vocab)
        drafter.start(prompt)
        started = time.perf_counter()
        proposal = drafter.propose(16, GREEDY)
        draft_ms = (time.perf_counter() - started) * 1e3 / max(1, len(proposal.tokens))
        print(f"== the ONNX draft alone: {len(proposal.tokens)} tokens at {draft_ms:.1f} ms/token")
        print(proposal.text_bytes.decode("utf-8", errors="replace"))

    print("== starting the verifier (loads Gemma-3-270M)...", flush=True)
    serve_config = ServeConfig(target=str(pair.target_hf_dir), port=0, threads=placement.verifier_threads)
    with VerifierProcess(serve_config, cpus=placement.verifier_cpus) as verifier, placement.edge_pinned():
        async def demo() -> tuple[object, list[dict]]:
            async with DelayProxy(PROFILES[profile], verifier.address) as proxy, \
                    VerifierClient(proxy.address) as client, VerifierClient(verifier.address) as admin:
                print(f"== speculative generation over gRPC through a simulated network ({PROFILES[profile].describe()}), "
                      f"draft-ahead on, draft length adaptive")
                streamed = await client.speculate(draft, prompt, GREEDY, max_new_tokens=max_new_tokens, on_text=_stream)
                print(f"\n== measuring at {profile}: cloud-only, speculative (draft length {draft_len}), speculative "
                      f"with draft-ahead and adaptive length", flush=True)
                return streamed, await profile_runs(profile, verifier.address, admin, draft, [prompt], config, lambda: None)

        streamed, runs = uvloop.run(demo())
    _print_demo_table(summarize(runs), profile)
    cloud = next(run for run in runs if run["mode"] == "cloud_only")
    identical = [list(streamed.target_token_ids) == cloud["target_token_ids"]] + [
        run["target_token_ids"] == cloud["target_token_ids"] for run in runs if run["mode"] != "cloud_only"]
    print(f"   every speculative output identical to cloud-only (target-only greedy): {'yes' if all(identical) else 'NO'}")
    if not all(identical):
        raise SystemExit("specbridge demo: a speculative output differs from target-only greedy decoding")


def _print_demo_table(rows: list[dict], profile: str) -> None:
    print(f"\n{'mode at ' + profile:<26}{'answer s':>10}{'x cloud':>9}{'tok/s':>8}{'acc.len':>9}{'ahead surv':>12}")
    for row in rows:
        survival = "-" if row["ahead_survival_rate"] is None else f"{row['ahead_survival_rate']:.0%}"
        print(f"{row['mode']:<26}{row['total_ms_p50'] / 1e3:>10.2f}{row['ratio_vs_cloud_only']:>8.2f}x"
              f"{row['tokens_per_s']:>8.1f}{row['mean_accepted_length']:>9.2f}{survival:>12}")
