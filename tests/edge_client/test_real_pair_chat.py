"""Chat on the real pair's models (slow): the verifier renders with the target tokenizer's own chat template.

The default pair's target (Gemma-3-270M base, converted from a GGUF that carries no chat template) has none,
and says so precisely; SmolLM2-135M-Instruct has a real one, so it is served as the target here, with its
ONNX export drafting: the rendered prompt is exactly `apply_chat_template(..., add_generation_prompt=True)`,
and speculative chat equals target-only chat, over the Python API and over `specbridge edge serve`.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from transformers import AutoTokenizer

import specbridge
from cloud_verifier.chat import render_chat
from cloud_verifier.errors import NoChatTemplateError
from cloud_verifier.launcher import VerifierProcess
from cloud_verifier.server import ServeConfig
from edge_client.api import Generation
from edge_client.launcher import EdgeServeProcess
from edge_client.openai_server import EdgeServeConfig
from shared.wire import ChatMessage

MESSAGES = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the capital of Japan?"}]
MAX_TOKENS = 24


@pytest.mark.slow
def test_the_default_targets_lack_of_a_chat_template_is_named(real_pair) -> None:
    tokenizer = AutoTokenizer.from_pretrained(real_pair.target_hf_dir)
    with pytest.raises(NoChatTemplateError, match="has no chat template"):
        render_chat(tokenizer, [ChatMessage("user", "hi")], "gemma-3-270m")


@pytest.mark.slow
def test_chat_renders_with_the_targets_own_template(real_pair) -> None:
    chat_target = real_pair.draft_hf_dir  # SmolLM2-135M-Instruct: the pair's model with a chat template
    tokenizer = AutoTokenizer.from_pretrained(chat_target)
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = list(tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"])

    async def generate(address: str) -> list[specbridge.ClientResult]:
        async with specbridge.connect(address, real_pair.draft_onnx_dir) as edge:
            return [await edge.generate(Generation(messages=MESSAGES, max_tokens=MAX_TOKENS, speculative=speculative))
                    for speculative in (True, False)]

    with VerifierProcess(ServeConfig(target=str(chat_target), port=0)) as verifier:
        speculative, target_only = asyncio.run(generate(verifier.address))
        config = EdgeServeConfig(server=verifier.address, draft=str(real_pair.draft_onnx_dir), port=0, model_name="smollm2")
        with EdgeServeProcess(config) as edge:
            client = openai.OpenAI(base_url=edge.base_url, api_key="unused", max_retries=0, timeout=300)
            response = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                      temperature=0)

    assert speculative.rendered_prompt == target_only.rendered_prompt == rendered
    assert speculative.prompt_token_count == len(chat_ids) == response.usage.prompt_tokens
    assert speculative.target_token_ids == target_only.target_token_ids
    assert response.choices[0].message.content == speculative.text and speculative.text.strip()
