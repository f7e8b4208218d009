"""Chat messages -> the prompt text the target reads, rendered by the target tokenizer's own chat template.

The verifier owns the target tokenizer, so it renders; the edge drafts on the text it is told.
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2
from transformers import PreTrainedTokenizerBase

from cloud_verifier.errors import ChatMessagesError, NoChatTemplateError
from shared.wire import ChatMessage


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage], target_name: str) -> str:
    """The messages as the target was tuned to read them, ending with the assistant's turn opened.

    The result holds the template's special tokens (BOS included): tokenize it without adding any,
    as `apply_chat_template(tokenize=True)` does.
    """
    if not tokenizer.chat_template:
        raise NoChatTemplateError(f"target {target_name} has no chat template: send a prompt instead of chat messages")
    try:
        return tokenizer.apply_chat_template([{"role": message.role, "content": message.content} for message in messages],
                                             tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as error:  # templates raise this to refuse a conversation (role order, roles)
        raise ChatMessagesError(f"target {target_name}'s chat template refused the messages: {error}") from None
