"""What a request must pass before it is routed: keys and prompt length (the body's size and JSON
are api/http.py's `read_body` and `parse_json`).

Every check raises an `ApiError` in OpenAI's shape whose message says what to change.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from api.chat import DEFAULT_OPTIONS, TemplateOptions, chat_prompt_ids
from api.errors import forbidden, unauthorized


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_api_key(headers: Mapping[str, str], api_key: str | None) -> None:
    if api_key is None:
        return
    token = bearer_token(headers)
    if token is None:
        raise unauthorized(
            "you didn't provide an API key (send the header Authorization: Bearer <key>)"
        )
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        raise unauthorized("incorrect API key provided")


def check_admin_key(headers: Mapping[str, str], admin_key: str | None) -> None:
    if admin_key is None:
        raise forbidden("admin routes are disabled (set the gateway's admin_key to enable them)")
    token = bearer_token(headers)
    if token is None or not hmac.compare_digest(token.encode(), admin_key.encode()):
        raise unauthorized(
            "admin routes need the admin key (send the header Authorization: Bearer <admin_key>)"
        )


class PromptCounter:
    """Counts prompt tokens with the model's tokenizer (a checkpoint dir), as the nodes will."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, model_dir: str) -> PromptCounter:
        from transformers import AutoTokenizer  # NOTE: slow import, only when a limit needs it

        if not (Path(model_dir) / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"gateway.tokenizer {model_dir} has no tokenizer_config.json "
                "(point it at the model's checkpoint directory)"
            )
        return cls(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))

    def count_text(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def count_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        options: TemplateOptions = DEFAULT_OPTIONS,
    ) -> int:
        """Tokens of the chat as the nodes will encode it (api/chat.py); 400 without a template."""
        return len(chat_prompt_ids(self.tokenizer, messages, tools, options))
