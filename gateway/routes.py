"""The client-facing routes: OpenAI completions/chat, native /generate, /v1/models, /health,
/metrics. Every response carries the request's `X-Request-Id`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.errors import ApiError, server_error
from api.http import (
    ClientGone,
    ClientWatch,
    error_response,
    parse_json,
    read_body,
    request_id,
    until_disconnect,
)

from .context import Gateway
from .dispatch import open_request
from .events import Events
from .exchange import Exchange
from .limits import check_api_key
from .logs import log
from .metrics import CONTENT_TYPE
from .migration import StreamRelay
from .outcome import Finished
from .requests import Prepared, prepare
from .streaming import EventStreamResponse
from .tracker import Tracker

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"
THREADED_BODY_BYTES = 32 * 1024  # counting tokens of bodies this big leaves the event loop
MAX_BODY_SETTING = "gateway.max_body_bytes"  # what a 413 says to raise


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


def generation_route(route: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await generate(request, route)

    return endpoint


async def generate(request: Request, route: str) -> Response:
    gw, rid = gateway_of(request), request_id(request.headers)
    tracker = Tracker(gw.metrics, route, rid, gw.clock)
    watch = ClientWatch(request.receive)
    try:
        exchange, answer = await _open(request, gw, route, rid, tracker, watch)
    except ApiError as exc:
        watch.stop()
        tracker.finish(exc.status)
        return error_response(exc, rid)
    except ClientGone:
        watch.stop()
        tracker.finish(CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    except Exception:
        watch.stop()
        log.exception("request_crashed rid=%s route=%s", rid, route)
        tracker.finish(500)
        return error_response(server_error("the gateway failed on this request (see its log)"), rid)
    except BaseException:
        watch.stop()
        raise
    return _respond(gw, exchange, answer, tracker, watch)


async def _open(
    request: Request, gw: Gateway, route: str, rid: str, tracker: Tracker, watch: ClientWatch
) -> tuple[Exchange | None, Finished | Events]:
    """Checks, then the exchange that answers (see `open_request`)."""
    check_api_key(request.headers, gw.settings.api_key)
    tracker.admit(gw.settings.max_inflight)
    raw = await read_body(request, gw.settings.max_body_bytes, setting=MAX_BODY_SETTING)
    prepared = await _prepare(gw, route, parse_json(raw), len(raw))
    return await until_disconnect(watch, open_request(gw, prepared, rid))


def _respond(
    gw: Gateway,
    exchange: Exchange | None,
    answer: Finished | Events,
    tracker: Tracker,
    watch: ClientWatch,
) -> Response:
    headers = {"X-Request-Id": tracker.rid}
    if isinstance(answer, Finished):
        watch.stop()
        tracker.finish(answer.status)
        return Response(answer.body, answer.status, headers=headers, media_type=answer.media_type)
    assert exchange is not None
    relay = StreamRelay(gw, exchange.attempt.req, tracker.rid, tracker, exchange)

    def on_close() -> None:
        relay.abandon()  # NOTE: a no-op after a whole stream; covers one that never started
        tracker.finish(200)

    return EventStreamResponse(relay.events(exchange, answer), headers, on_close, watch)


async def _prepare(gw: Gateway, route: str, body: dict[str, Any], size: int) -> Prepared:
    limits = gw.limits()
    if limits.counter is not None and size > THREADED_BODY_BYTES:
        return await asyncio.to_thread(prepare, route, body, limits)
    return prepare(route, body, limits)


async def models(request: Request) -> Response:
    """The union of the decode instances' /v1/models."""
    gw, rid = gateway_of(request), request_id(request.headers)
    try:
        check_api_key(request.headers, gw.settings.api_key)
        cards = await gw.fetch_models()
    except ApiError as exc:
        return error_response(exc, rid)
    gw.models = frozenset(card["id"] for card in cards)
    return JSONResponse({"object": "list", "data": cards}, headers={"X-Request-Id": rid})


async def health(request: Request) -> Response:
    """200 while a request could be served (a decode instance, and a prefill one in PD mode
    unless decode instances may prefill: `prefill_fallback`)."""
    gw = gateway_of(request)
    now = gw.clock()
    ready = {role: len(gw.pool.available(role, now)) for role in ("prefill", "decode")}
    prefill_ok = ready["prefill"] > 0 or gw.settings.prefill_fallback or not gw.pool.has_prefill()
    ok = ready["decode"] > 0 and prefill_ok
    body = {"status": "ok" if ok else "unavailable", "available": ready}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    gw = gateway_of(request)
    text = gw.metrics.render(gw.pool.all(), gw.clock())
    return Response(text, media_type=CONTENT_TYPE)
