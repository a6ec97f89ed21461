"""The one chat-template encoder: chat messages to prompt token ids, as the model's template
renders them. The nodes tokenize chats with it and the gateway counts their tokens with it, so
both see the same prompt.

Rendered as vLLM renders them: a request's `add_generation_prompt`, `continue_final_message` and
`chat_template_kwargs` reach the template (`TemplateOptions`), and OpenAI's `developer` role is
a system message to a template that does not know it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from .errors import invalid_request


@dataclass(frozen=True)
class TemplateOptions:
    """How a chat is rendered besides its messages and tools (vLLM's request fields)."""

    add_generation_prompt: bool = True  # open an assistant turn after the messages
    continue_final_message: bool = False  # leave the last message open: the model goes on with it
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # the template's own variables


DEFAULT_OPTIONS = TemplateOptions()


def chat_prompt_ids(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    options: TemplateOptions = DEFAULT_OPTIONS,
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
            template_messages(messages, tokenizer.chat_template),
            tools=[dict(t) for t in tools] if tools else None,
            tokenize=False,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
            **options.kwargs,
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


def template_messages(messages: Sequence[Mapping[str, Any]], template: Any) -> list[dict[str, Any]]:
    """The messages as the template sees them. NOTE: vLLM's rule: a template that never names the
    `developer` role (most do not; OpenAI's newer name for system) gets each developer message as
    a system one, every system message merged into one at the start (templates want it first)."""
    out = [dict(m) for m in messages]
    if all(m["role"] != "developer" for m in out) or _names_developer(template):
        return out
    for m in out:
        if m["role"] == "developer":
            m["role"] = "system"
    systems = [m for m in out if m["role"] == "system"]
    if len(systems) == 1 and out[0] is systems[0]:
        return out
    merged = {
        "role": "system",
        "content": "\n\n".join(m["content"] for m in systems if m["content"]),
    }
    return [merged, *(m for m in out if m["role"] != "system")]


def _names_developer(template: Any) -> bool:
    text = str(template)  # NOTE: a tokenizer may hold several named templates (a dict)
    return '"developer"' in text or "'developer'" in text
