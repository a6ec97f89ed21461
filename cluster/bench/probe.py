"""What the benchmark asks the server before it starts: its URL, model id, tokenizer, PD shape."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import httpx

from .backends import DEFAULT_PORTS


class ServerError(RuntimeError):
    """The server cannot be asked (down, wrong address) or answers something unusable."""


def base_url_of(args: argparse.Namespace) -> str:
    if args.base_url:
        return args.base_url.rstrip("/").removesuffix("/v1")
    return f"http://{args.host}:{args.port or DEFAULT_PORTS.get(args.backend, 30000)}"


def auth_headers() -> dict[str, str]:
    """As SGLang's bench_serving: OPENAI_API_KEY, when set, goes as a bearer token."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def get_json(url: str) -> Any:
    try:
        response = httpx.get(url, headers=auth_headers(), timeout=30.0, trust_env=False)
    except httpx.HTTPError as exc:
        raise ServerError(
            f"cannot reach {url} ({type(exc).__name__}: {exc}); is the server up? "
            "(check --base-url or --host/--port)"
        ) from None
    if response.status_code != 200:
        raise ServerError(f"GET {url} answered {response.status_code}: {response.text[:300]}")
    try:
        return response.json()
    except ValueError:
        raise ServerError(f"GET {url} did not answer JSON: {response.text[:300]}") from None


def model_cards(base_url: str) -> list[dict[str, Any]]:
    cards = get_json(f"{base_url}/v1/models").get("data") or []
    if not cards:
        raise ServerError(f"{base_url}/v1/models lists no model (give --model)")
    return cards


def resolve_model(args: argparse.Namespace, base_url: str) -> tuple[str, str]:
    """(model id to send, local tokenizer dir), asking the server only for what flags leave out."""
    if args.model and args.tokenizer:
        return args.model, args.tokenizer
    if args.model and not args.tokenizer and Path(args.model).is_dir():
        return args.model, args.model
    card = model_cards(base_url)[0]
    model = args.model or card["id"]
    tokenizer = args.tokenizer or card.get("root")
    if not tokenizer or not Path(tokenizer).is_dir():
        raise ServerError(
            f"no local tokenizer for {model!r}: give --tokenizer DIR (a checkpoint directory "
            "on this machine; nothing is downloaded)"
        )
    return model, tokenizer


def available_instances(base_url: str) -> dict[str, int] | None:
    """{'prefill': n, 'decode': m} from a pdserve gateway's GET /health; None from other servers."""
    try:
        answer = get_json(f"{base_url}/health")
    except ServerError:
        return None
    counts = answer.get("available") if isinstance(answer, dict) else None
    if not isinstance(counts, dict):
        return None
    return {role: int(counts.get(role) or 0) for role in ("prefill", "decode")}


def pd_instances(base_url: str) -> dict[str, int]:
    """The gateway's instances; an error unless it has prefill instances to disaggregate with."""
    counts = available_instances(base_url)
    if not counts or not counts["prefill"]:
        raise ServerError(
            f"--pd-separated: {base_url}/health reports no prefill instance "
            "(point --base-url at a PD gateway, or drop --pd-separated for a colocated server)"
        )
    return counts
