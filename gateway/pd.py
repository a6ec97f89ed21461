"""SGLang's PD protocol, as the gateway speaks it: the fields added to the body both nodes get,
and what a node's answer means for the attempt (`Finished`, `AttemptFailed`, `Refused`)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import httpx

from api.errors import ApiError, from_body, server_error
from api.sse import SSEDecoder, error_in

from .context import Pair
from .requests import Prepared
from .workers import Worker


@dataclass(frozen=True)
class Finished:
    """A whole response to hand to the client as it is."""

    status: int
    body: bytes
    media_type: str = "application/json"


class AttemptFailed(Exception):
    def __init__(self, worker: Worker, error: ApiError) -> None:
        super().__init__(error.message)
        self.worker = worker
        self.error = error


class Refused(Exception):
    def __init__(self, answer: Finished) -> None:
        super().__init__(answer.status)
        self.answer = answer


def pd_body(req: Prepared, rid: str, pair: Pair, rng: random.Random) -> dict[str, Any]:
    body = dict(req.body)
    body["rid"] = rid
    prefill = pair.prefill
    if prefill is None:
        return body  # colocated: the decode node prefills itself
    if req.rooms is None:
        body["bootstrap_host"] = prefill.host
        body["bootstrap_port"] = prefill.bootstrap_port
        body["bootstrap_room"] = rng.getrandbits(63)
    else:
        n = req.rooms
        body["bootstrap_host"] = [prefill.host] * n
        body["bootstrap_port"] = [prefill.bootstrap_port] * n
        body["bootstrap_room"] = [rng.getrandbits(63) for _ in range(n)]
    return body


def prefill_outcome(prefill: Worker, response: httpx.Response) -> Finished | ApiError | None:
    status = response.status_code
    if 400 <= status < 500:
        return Finished(status, response.content)
    if status >= 500:
        text = response.content[:300].decode(errors="replace")
        return server_error(f"prefill instance {prefill.url} answered HTTP {status}: {text}", 502)
    if b'"error"' not in response.content or "event-stream" not in response.headers.get(
        "content-type", ""
    ):
        return None
    for payload in SSEDecoder().feed(response.content + b"\n\n"):
        error = error_in(payload)
        if error is not None:
            if is_client_error(error):
                return Finished(400, json.dumps({"error": error}).encode())
            return from_body(502, {"error": error})
    return None


def is_client_error(error: dict[str, Any]) -> bool:
    """An error event blames the request when its `type` says so (its `code` is a name, not a
    status)."""
    return error.get("type") == "invalid_request_error"
