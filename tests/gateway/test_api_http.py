"""The shared HTTP helpers (api/http.py) on their own: request ids, error responses, bounded
bodies, JSON objects, and the watch for a client leaving."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import Request

from api.errors import ApiError, rate_limited
from api.http import (
    ClientGone,
    ClientWatch,
    error_response,
    parse_json,
    read_body,
    request_id,
    status_code_name,
    until_disconnect,
)


def request_of(chunks: list[bytes], headers: dict[str, str] | None = None) -> Request:
    """A Starlette request whose body arrives in `chunks`, then the client leaves."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i + 1 < len(chunks)}
        for i, c in enumerate(chunks)
    ]
    messages.append({"type": "http.disconnect"})

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw}, receive)


def test_request_id_keeps_a_sane_token_else_makes_one() -> None:
    assert request_id({"x-request-id": "req-42:a.b"}) == "req-42:a.b"
    for bad in ({"x-request-id": "bad id\t!"}, {"x-request-id": "x" * 129}, {}):
        made = request_id(bad)
        assert len(made) == 32 and made != request_id(bad)


def test_error_response_carries_the_error_headers_and_the_request_id() -> None:
    response = error_response(rate_limited("busy"), "r1")
    assert response.status_code == 429 and json.loads(response.body)["error"]["message"] == "busy"
    assert response.headers["retry-after"] == "1" and response.headers["x-request-id"] == "r1"
    assert "x-request-id" not in error_response(ApiError(400, "bad"), None).headers


def test_read_body_stops_past_the_limit() -> None:
    async def read(chunks: list[bytes], headers: dict[str, str] | None = None, **kw: Any) -> bytes:
        return await read_body(request_of(chunks, headers), 10, **kw)

    assert asyncio.run(read([b"01234", b"56789"])) == b"0123456789"
    with pytest.raises(ApiError) as declared:
        asyncio.run(read([b"x"], {"content-length": "11"}, setting="gateway.max_body_bytes"))
    assert declared.value.status == 413 and "raise gateway.max_body_bytes" in declared.value.message
    with pytest.raises(ApiError) as streamed:
        asyncio.run(read([b"0123456", b"789ab"]))
    assert streamed.value.status == 413 and "12 bytes" in streamed.value.message


def test_parse_json_wants_an_object() -> None:
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for body, says in ((b"{nope", "JSON"), (b"[1]", "JSON object, not list")):
        with pytest.raises(ApiError, match=says) as info:
            parse_json(body)
        assert info.value.status == 400


def test_until_disconnect_gives_the_result_or_client_gone() -> None:
    async def main() -> None:
        left = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await left.wait()
            return {"type": "http.disconnect"}

        watch = ClientWatch(receive)
        assert await until_disconnect(watch, asyncio.sleep(0, "done")) == "done"
        slow = asyncio.ensure_future(asyncio.sleep(3600))
        waiting = asyncio.ensure_future(until_disconnect(watch, slow))
        await asyncio.sleep(0)
        left.set()
        with pytest.raises(ClientGone):
            await waiting
        assert slow.cancelled() and watch.gone

    asyncio.run(main())


def test_status_code_names() -> None:
    assert status_code_name(404) == "not_found" and status_code_name(405) == "method_not_allowed"
    assert status_code_name(599) == "http_error"
