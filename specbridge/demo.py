"""`make demo`: the main job end to end on the real pair (SmolLM2-135M draft, Gemma-3-270M target).

Drafts with the ONNX draft alone, then runs speculative generation (edge draft, cross-vocabulary
verification) and checks it token for token against the target's own greedy output.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from shared.decoding import DecodingConfig


def run_demo(pair_name: str, prompt: str, max_new_tokens: int, draft_len: int) -> None:
    from specbridge.loading import load_drafter, load_target
    from specbridge.model_zoo import prepare_pair
    from specbridge.speculative import speculative_generate

    pair = prepare_pair(pair_name)
    print(f"== pair {pair.name}\n   draft (edge, onnxruntime): {pair.draft_onnx_dir}\n   target (verifier, torch):  {pair.target_hf_dir}")
    print(f"== prompt\n{prompt}")

    target, target_vocab = load_target(pair.target_hf_dir)
    drafter = load_drafter(pair.draft_onnx_dir, target_vocab=target_vocab)
    drafter.start(prompt)
    started = time.perf_counter()
    proposal = drafter.propose(16, DecodingConfig(), np.random.default_rng(0))
    draft_ms = (time.perf_counter() - started) * 1e3 / max(1, len(proposal.tokens))
    print(f"== ONNX draft alone: {len(proposal.tokens)} tokens, {draft_ms:.1f} ms/token")
    print(proposal.text_bytes.decode("utf-8", errors="replace"))

    print(f"== speculative greedy generation ({max_new_tokens} target tokens, draft length {draft_len})", file=sys.stderr)
    result = speculative_generate(drafter, target, target_vocab, prompt, max_new_tokens=max_new_tokens,
                                  draft_len=draft_len, config=DecodingConfig())
    print(f"== specbridge output\n{result.text}")
    inputs = torch.tensor([list(result.prompt_ids)])
    started = time.perf_counter()
    with torch.inference_mode():
        reference = target.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                          do_sample=False)[0, inputs.shape[1]:].tolist()
    target_only_s = time.perf_counter() - started
    identical = reference == list(result.target_token_ids)
    print(f"== {len(result.target_token_ids)} tokens in {result.rounds} rounds: mean accepted length "
          f"{result.mean_accepted_length:.2f} target tokens per forward, {result.forwards_per_token:.2f} forwards/token")
    print(f"   wall {result.wall_s:.2f} s speculative (edge and verifier on this one CPU) vs {target_only_s:.2f} s target-only")
    print(f"   identical to the target's own greedy generate(): {'yes' if identical else 'NO'}")
    if not identical:
        raise SystemExit("specbridge demo: output differs from target-only greedy decoding")
