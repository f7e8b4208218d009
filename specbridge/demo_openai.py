"""The end of `make demo`: the same generation through an OpenAI client against `specbridge edge serve`.

Starts the verifier and `specbridge edge serve` as a user would, shows the equivalent curl command,
streams the answer with the official `openai` package and checks it token for token against the
target's own greedy output (target-only generation on the verifier).
"""

from __future__ import annotations

import json
import shlex
import sys


def run_openai_demo(pair_name: str, prompt: str, max_new_tokens: int) -> None:
    import openai

    import specbridge
    from cloud_verifier.launcher import VerifierProcess
    from cloud_verifier.server import ServeConfig
    from edge_client.api import Generation
    from edge_client.launcher import EdgeServeProcess
    from edge_client.openai_server import EdgeServeConfig
    from shared.event_loop import run
    from specbridge.model_zoo import prepare_pair

    pair = prepare_pair(pair_name)
    model = pair.target_hf_dir.parent.name
    print("\n== the same generation from any OpenAI client: starting the verifier and `specbridge edge serve`...",
          flush=True)
    with VerifierProcess(ServeConfig(target=str(pair.target_hf_dir), port=0)) as verifier, \
            EdgeServeProcess(EdgeServeConfig(server=verifier.address, draft=str(pair.draft_onnx_dir), port=0,
                                             model_name=model)) as edge:
        body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0}
        print(f"   specbridge edge serve --server {verifier.address} --draft {pair.draft_onnx_dir} --model-name {model}")
        print(f"   curl {edge.base_url}/completions -H 'Content-Type: application/json' "
              f"-d {shlex.quote(json.dumps(body))}")
        print("== streamed by the openai package (temperature 0):", flush=True)
        client = openai.OpenAI(base_url=edge.base_url, api_key="unused", max_retries=0, timeout=600)
        texts, usage = [], None
        for chunk in client.completions.create(**body, stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                texts.append(chunk.choices[0].text)
                sys.stdout.write(chunk.choices[0].text)
                sys.stdout.flush()
            usage = chunk.usage or usage

        async def target_only() -> str:
            async with specbridge.connect(verifier.address) as baseline:
                request = Generation(prompt=prompt, max_tokens=max_new_tokens, speculative=False)
                return (await baseline.generate(request)).text

        expected = run(target_only())
    details, extension = usage.completion_tokens_details, usage.model_extra["specbridge"]
    print(f"\n   usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens; "
          f"{details.accepted_prediction_tokens} drafted tokens accepted, {details.rejected_prediction_tokens} rejected; "
          f"{extension['rounds']} rounds, {extension['mean_accepted_length']:.2f} target tokens per round")
    identical = "".join(texts) == expected
    print(f"   identical to target-only greedy decoding: {'yes' if identical else 'NO'}")
    if not identical:
        raise SystemExit("specbridge demo: the OpenAI endpoint's output differs from target-only greedy decoding")
