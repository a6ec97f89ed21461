"""What a node's answer means for an attempt, decided here and nowhere else (pure functions of the
status code, the body and the first events; tests/gateway/test_outcome.py checks them directly).

    Finished       a whole answer for the client, relayed as it is (decode's answer, not streamed)
    Refused        the request itself is wrong: a 4xx, or an error event of type
                   invalid_request_error; relayed, never retried
    AttemptFailed  that instance failed: a 5xx, a transport error, a stream that ends or begins with
                   another error before its first event; retried on another pair while nothing
                   has reached the client. A 503 (or error event) with code "draining" is one
                   too, but `draining`: the node is shutting down, not broken
    None           prefill did its part (a 2xx without an error event)

`Refused` and `AttemptFailed` are exceptions: the exchange raises the verdict, dispatch acts on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from api.errors import DRAINING, ApiError, server_error
from api.sse import SSEDecoder, error_in

from .events import Events

CLIENT_ERROR_TYPE = "invalid_request_error"  # an error event of this type is a refusal
UPSTREAM_ERROR = "upstream_error"  # the code of an instance's failure, unless it named its own


@dataclass(frozen=True)
class Finished:
    """A whole response to hand to the client as it is."""

    status: int
    body: bytes
    media_type: str = "application/json"


class Refused(Exception):
    """A node refused the request (the request is wrong, not the node): relay `answer`."""

    def __init__(self, answer: Finished) -> None:
        super().__init__(answer.status)
        self.answer = answer


class AttemptFailed(Exception):
    """Instance `url` failed this attempt; `error` is what the client gets if no retry is left."""

    def __init__(self, url: str, error: ApiError) -> None:
        super().__init__(error.message)
        self.url = url
        self.error = error

    @property
    def draining(self) -> bool:
        """The instance refused because it is shutting down: no fault of its own (its breaker
        is left alone), but no more requests should go there."""
        return self.error.code == DRAINING


def decode_answer(
    url: str, status: int, body: bytes, media_type: str
) -> Finished | Refused | AttemptFailed:
    """A decode node's whole answer: not streamed, or of status 400 or more."""
    if status < 400:
        return Finished(status, body, media_type)
    return refusal_or_failure("decode", url, status, body)


def first_events(url: str, first: Events) -> Events | Refused | AttemptFailed:
    """The first events of a decode stream: relay them, or what their error means."""
    if not first.any:
        return failed("decode", url, "its stream ended before the first event")
    error = error_in(first.first) if first.first is not None else None
    return first if error is None else error_verdict("decode", url, error)


def prefill_answer(
    url: str, status: int, body: bytes, media_type: str
) -> Refused | AttemptFailed | None:
    """A prefill node's whole answer: None when it did its part."""
    if status >= 400:
        return refusal_or_failure("prefill", url, status, body)
    error = _stream_error(body, media_type)
    return None if error is None else error_verdict("prefill", url, error)


def refusal_or_failure(role: str, url: str, status: int, body: bytes) -> Refused | AttemptFailed:
    """An answer of status 400 or more: the node's 4xx is relayed, a 5xx fails the instance."""
    if status < 500:
        return Refused(Finished(status, body))
    if status == 503 and _error_code(body) == DRAINING:
        return failed(role, url, "it is draining (shutting down)", DRAINING)
    return failed(role, url, f"HTTP {status}: {body[:300].decode(errors='replace')}")


def error_verdict(role: str, url: str, error: dict[str, Any]) -> Refused | AttemptFailed:
    """An error event in a 200 answer: the client's fault (`type` invalid_request_error, or an
    integer 4xx `code`, as SGLang's nodes send) is a refusal with that status, relayed with the
    code as a string; anything else fails the instance."""
    code = error.get("code")
    if is_refusal(error):
        status = code if isinstance(code, int) else 400
        relayed = {**error, "code": None if code is None else str(code)}
        return Refused(Finished(status, json.dumps({"error": relayed}).encode()))
    what = f"its stream carried an error: {error.get('message')}"
    return failed(role, url, what, code if isinstance(code, str) and code else UPSTREAM_ERROR)


def is_refusal(error: dict[str, Any]) -> bool:
    """Is an error event the client's fault (`type` invalid_request_error, or an integer 4xx
    `code`, as SGLang's nodes send)?"""
    code = error.get("code")
    return (isinstance(code, int) and 400 <= code < 500) or error.get("type") == CLIENT_ERROR_TYPE


def is_draining(error: dict[str, Any]) -> bool:
    """Did the node end the request because it is shutting down (not because it failed)?"""
    return error.get("code") == DRAINING


def unreachable(role: str, url: str, exc: Exception) -> AttemptFailed:
    """The exchange with the node broke (connect, read, timeout) before its answer was whole."""
    return failed(role, url, f"{type(exc).__name__}: {exc}")


def failed(role: str, url: str, what: str, code: str = UPSTREAM_ERROR) -> AttemptFailed:
    return AttemptFailed(url, server_error(f"{role} instance {url} failed: {what}", 502, code=code))


def failed_mid_stream(url: str, error: dict[str, Any]) -> ApiError:
    """The decode node ended its stream with a server-side error event after events reached
    the client: the error the client gets if the stream cannot move on."""
    code = error.get("code")
    return server_error(
        f"decode instance {url} failed mid-stream ({error.get('message')}); the response is "
        "incomplete",
        502,
        code=code if isinstance(code, str) and code else UPSTREAM_ERROR,
    )


def cut_mid_stream(url: str, exc: Exception) -> ApiError:
    """The decode stream broke after events reached the client: the error event it ends with."""
    return server_error(
        f"decode instance {url} failed mid-stream ({exc}); the response is incomplete",
        502,
        code=UPSTREAM_ERROR,
    )


def _error_code(body: bytes) -> Any:
    """The `code` of an answer in OpenAI's error shape, None for any other body."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def _stream_error(body: bytes, media_type: str) -> dict[str, Any] | None:
    """The first error event of a whole SSE answer, None when it has none (or is not SSE)."""
    if b'"error"' not in body or "event-stream" not in media_type:
        return None  # NOTE: the cheap test first: prefill answers every request
    for payload in SSEDecoder().feed(body + b"\n\n"):
        error = error_in(payload)
        if error is not None:
            return error
    return None
