"""`make demo`: the main job end to end on the real pair (SmolLM2-135M draft, Gemma-3-270M target).

Shows the ONNX draft alone, then starts the verifier (`specbridge serve`, a child process on
loopback), streams a speculative generation from the edge client over gRPC, asks the same
verifier for target-only generation, and checks the two token for token.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import uvloop

from shared.decoding import DecodingConfig


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_demo(pair_name: str, prompt: str, max_new_tokens: int, draft_len: int) -> None:
    from cloud_verifier.launcher import VerifierProcess
    from cloud_verifier.server import ServeConfig
    from edge_client.client import VerifierClient, load_edge_draft
    from edge_client.drafter import Drafter
    from specbridge.model_zoo import prepare_pair

    pair = prepare_pair(pair_name)
    print(f"== pair {pair.name}\n   edge draft (onnxruntime): {pair.draft_onnx_dir}\n   verifier target (torch): {pair.target_hf_dir}")
    print(f"== prompt\n{prompt}")

    draft = load_edge_draft(pair.draft_onnx_dir)
    drafter = Drafter(draft.runtime, draft.vocab)
    drafter.start(prompt)
    started = time.perf_counter()
    proposal = drafter.propose(16, DecodingConfig(), np.random.default_rng(0))
    draft_ms = (time.perf_counter() - started) * 1e3 / max(1, len(proposal.tokens))
    print(f"== the ONNX draft alone: {len(proposal.tokens)} tokens at {draft_ms:.1f} ms/token")
    print(proposal.text_bytes.decode("utf-8", errors="replace"))

    print("== starting the verifier (loads Gemma-3-270M)...", flush=True)
    with VerifierProcess(ServeConfig(target=str(pair.target_hf_dir), port=0)) as verifier:
        async def both():
            async with VerifierClient(verifier.address) as client:
                print(f"== speculative generation over gRPC ({verifier.address}), draft length {draft_len}")
                speculative = await client.speculate(draft, prompt, DecodingConfig(), max_new_tokens=max_new_tokens,
                                                     draft_len=draft_len, on_text=_stream)
                print("\n== target-only generation (Generate RPC), for comparison", flush=True)
                baseline = await client.generate(prompt, DecodingConfig(), max_new_tokens=max_new_tokens)
                return speculative, baseline

        speculative, baseline = uvloop.run(both())
    tokens = len(speculative.target_token_ids)
    identical = speculative.target_token_ids == baseline.target_token_ids
    print(f"== {tokens} target tokens in {speculative.rounds} rounds: {tokens / speculative.rounds:.2f} tokens per target "
          f"forward (target-only: 1.00)")
    print(f"   wall {speculative.wall_ms / 1e3:.2f} s speculative vs {baseline.wall_ms / 1e3:.2f} s target-only "
          f"(edge and verifier share this machine's CPU here)")
    print(f"   of which edge drafting {sum(speculative.draft_ms_per_round) / 1e3:.2f} s, verification round trips "
          f"{sum(speculative.round_trip_ms) / 1e3:.2f} s")
    print(f"   identical to target-only greedy decoding: {'yes' if identical else 'NO'}")
    if not identical:
        raise SystemExit("specbridge demo: the speculative output differs from target-only greedy decoding")
