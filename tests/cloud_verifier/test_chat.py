"""Chat rendering on the verifier: the target tokenizer's own template, exactly; precise errors when it cannot."""

from __future__ import annotations

import copy

import pytest

from cloud_verifier.chat import render_chat
from cloud_verifier.errors import ChatMessagesError, NoChatTemplateError
from shared.tokenizer_zoo import load_tokenizer
from shared.wire import ChatMessage
from tests.edge_client.conftest import CHAT_TEMPLATE

MESSAGES = (ChatMessage("system", "Be brief."), ChatMessage("user", "Où est Tokyo ?\n"))
STRICT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                   "{{ raise_exception('System role not supported') }}{% endif %}{{ message['content'] }}{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = copy.deepcopy(load_tokenizer("mistral"))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_renders_what_the_tokenizer_renders_with_the_assistant_turn_open(tokenizer) -> None:
    rendered = render_chat(tokenizer, MESSAGES, "tiny")
    as_dicts = [{"role": message.role, "content": message.content} for message in MESSAGES]
    assert rendered == tokenizer.apply_chat_template(as_dicts, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<s><|system|>") and rendered.endswith("<|assistant|>\n")
    # Tokenized without added specials, the rendering is exactly the tokenizer's own chat tokenization.
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids == list(tokenizer.apply_chat_template(as_dicts, tokenize=True, add_generation_prompt=True)["input_ids"])


def test_a_target_without_a_template_is_a_precondition_error() -> None:
    with pytest.raises(NoChatTemplateError, match="target tiny has no chat template: send a prompt"):
        render_chat(load_tokenizer("mistral"), MESSAGES, "tiny")


def test_a_template_that_refuses_the_messages_is_an_argument_error(tokenizer) -> None:
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = STRICT_TEMPLATE
    with pytest.raises(ChatMessagesError, match="System role not supported"):
        render_chat(strict, MESSAGES, "tiny")
