"""What a request must pass before it is routed: keys, body size, JSON, prompt length.

Every check raises an `ApiError` in OpenAI's shape whose message says what to change.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.requests import Request

from api.errors import ApiError, forbidden, invalid_request, too_large, unauthorized


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


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, or a 413 once it is known to exceed `max_bytes`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _body_too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _body_too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(size: int, max_bytes: int) -> ApiError:
    return too_large(
        f"request body of {size} bytes or more is over this gateway's limit of {max_bytes} bytes "
        "(send a shorter request, or raise gateway.max_body_bytes)"
    )


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise invalid_request(f"could not parse the JSON body of the request: {exc}") from None
    if not isinstance(value, dict):
        raise invalid_request(f"the request body must be a JSON object, not {type(value).__name__}")
    return value


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

    def count_chat(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """Tokens of the chat as its template renders it (joined contents if it has none)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return self.count_text("\n".join(str(m.get("content") or "") for m in messages))
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return len(self.tokenizer.encode(text, add_special_tokens=False))
