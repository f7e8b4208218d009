#!/usr/bin/env bash
# What a person with a CUDA GPU runs to check the verifier there (the CI machines have none):
#   1. lossless: greedy speculative decoding equals the target's own greedy generate(), token for token, on the
#      device, in float32 and bfloat16, on the tiny pairs and the real (default) pair;
#   2. throughput: `specbridge bench throughput` with the verifier on the GPU, 1..64 clients.
# Writes JSON under $OUT (default results/gpu). Usage: benchmarks/gpu_check.sh [cuda[:N]]
set -euo pipefail
DEVICE="${1:-cuda}"
OUT="${OUT:-results/gpu}"
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"

"$PYTHON" - "$DEVICE" "$OUT/lossless.json" <<'PY'
import json, sys, tempfile
from pathlib import Path
import torch
from shared.decoding import DecodingConfig
from specbridge.loading import load_drafter, load_target
from specbridge.model_zoo import build_tiny_pair, prepare_pair
from specbridge.prompts import HELD_OUT_PROMPTS
from specbridge.speculative import speculative_generate
from tests.lossless_prompts import LOSSLESS_PROMPTS

device, out = sys.argv[1], sys.argv[2]
MAX_NEW_TOKENS = 24
root = Path(tempfile.mkdtemp(prefix="specbridge-gpu-"))
pairs = [(name, build_tiny_pair(name, root), LOSSLESS_PROMPTS)
         for name in ("tiny-gpt2-mistral", "tiny-deepseek-gpt2", "tiny-mistral-gemma3arch", "tiny-same-gpt2")]
pairs.append(("real", prepare_pair(progress=False), HELD_OUT_PROMPTS[:6]))
results = []
for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    for name, pair, prompts in pairs:
        target, vocab = load_target(pair.target_hf_dir, device=device, dtype=dtype)
        drafter = load_drafter(pair.draft_onnx_dir, target_vocab=vocab)
        for prompt in prompts:
            result = speculative_generate(drafter, target, vocab, prompt, max_new_tokens=MAX_NEW_TOKENS, draft_len=6,
                                          config=DecodingConfig())
            inputs = torch.tensor([list(result.prompt_ids)], device=target.device)
            with torch.inference_mode():
                reference = target.model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                                  max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, inputs.shape[1]:].tolist()
            same = list(result.target_token_ids) == reference
            results.append({"pair": name, "dtype": dtype_name, "prompt": prompt[:40], "identical": same,
                            "mean_accepted_length": result.mean_accepted_length})
            print(f"[gpu-check] {name} {dtype_name}: {'identical' if same else 'DIFFERS'}: {prompt[:40]!r}", file=sys.stderr)
        del target
        torch.cuda.empty_cache()
json.dump({"device": torch.cuda.get_device_name(device), "results": results}, open(out, "w"), indent=1)
differing = [r for r in results if not r["identical"]]
print(f"[gpu-check] {len(results) - len(differing)}/{len(results)} identical; wrote {out}", file=sys.stderr)
# float32 must be exact; bfloat16 may flip near-ties between a batched and a one-row forward: reported, not failed.
sys.exit(1 if any(r["dtype"] == "float32" for r in differing) else 0)
PY

for dtype in float32 bfloat16; do
  "$PYTHON" -m specbridge.cli bench throughput --device "$DEVICE" --dtype "$dtype" --clients 1,2,4,8,16,32,64 \
    --prompts 64 --max-new-tokens 64 --json "$OUT/throughput_$dtype.json" --plot "$OUT/throughput_$dtype.png"
done
