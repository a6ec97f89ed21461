"""The one chat-template encoder: chat messages to prompt token ids, as the model's template
renders them. The nodes tokenize chats with it and the gateway counts their tokens with it, so
both see the same prompt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError

from .errors import invalid_request


def chat_prompt_ids(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a chat, as `tokenizer.apply_chat_template(..., tokenize=True)` makes them.

    `tokenizer` is a transformers tokenizer. The template writes any bos token itself, so the
    rendered text is encoded without adding special tokens (what transformers does). `tools`
    (OpenAI's function tools) go to the template, which decides how the model sees them. A model
    without a chat template is a 400 (the client should send a plain prompt).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise invalid_request(
            f"the tokenizer of {tokenizer.name_or_path} has no chat template (send a plain "
            "prompt to /v1/completions, or add chat_template to its tokenizer_config.json)"
        )
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tools=[dict(t) for t in tools] if tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except (TemplateError, TypeError, ValueError, KeyError) as exc:
        # NOTE: the template itself decides what it takes (roles in order, fields it reads);
        # what it cannot render is the request's to fix, not a server error
        raise invalid_request(
            f"the chat template of {tokenizer.name_or_path} cannot render these messages "
            f"and tools: {type(exc).__name__}: {str(exc)[:300]}",
            param="messages",
        ) from None
    return list(tokenizer.encode(text, add_special_tokens=False))
