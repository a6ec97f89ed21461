"""vLLM's /tokenize and /detokenize, which a node answers and the gateway passes on to one.

    POST /tokenize    {"prompt": "..."}  or  {"messages": [...], chat template fields}
                      -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"tokens": [ids]}  -> {"prompt": "..."}

A prompt is encoded as /v1/completions encodes it (`add_special_tokens`, default true); a chat
as /v1/chat/completions renders it (api/chat.py: `add_generation_prompt`,
`continue_final_message`, `chat_template_kwargs`, `tools`), so a client can count what a
request will cost before it sends it. `model` is optional; given, it must be the served one.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from .openai import ChatCompletionRequest, FalseOrNull, TrueOrNull


class TokenizePrompt(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str
    add_special_tokens: TrueOrNull = True
    return_token_strs: FalseOrNull = False


class TokenizeChat(ChatCompletionRequest):
    """A chat, rendered as /v1/chat/completions renders it (its sampling fields are unused)."""

    model: str | None = None  # type: ignore[assignment]
    return_token_strs: FalseOrNull = False
    add_special_tokens: FalseOrNull = False  # NOTE: true is refused: the template writes them


class Detokenize(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
