"""/tokenize and /detokenize (vLLM's; api/tokenize.py): answered by a decode instance, which
encodes exactly as it will for generation. The gateway passes the body to a routable one (the
next, if one cannot be reached) and its answer back; /version it answers itself."""

from __future__ import annotations

import httpx
from starlette.requests import Request
from starlette.responses import Response

from api.errors import ApiError, server_error
from api.http import error_response, read_body, request_id

from .context import Gateway
from .limits import check_api_key
from .routes import MAX_BODY_SETTING, gateway_of


async def tokenizing(request: Request) -> Response:
    gw = gateway_of(request)
    rid = request_id(request.headers)
    try:
        check_api_key(request.headers, gw.settings.api_key)
        raw = await read_body(request, gw.settings.max_body_bytes, setting=MAX_BODY_SETTING)
        answer = await _ask_a_decode(gw, request.url.path, raw, rid)
    except ApiError as exc:
        return error_response(exc, rid)
    headers = {"X-Request-Id": rid}
    return Response(answer.content, answer.status_code, headers, media_type="application/json")


async def _ask_a_decode(gw: Gateway, route: str, raw: bytes, rid: str) -> httpx.Response:
    workers = gw.pool.available("decode", gw.clock())
    gw.rng.shuffle(workers)
    failed = "no decode instance is ready"
    for worker in workers:
        headers = gw.upstream.headers(rid, len(raw))
        try:
            return await gw.upstream.call(gw.upstream.post(worker.url, route, raw, headers))
        except httpx.HTTPError as exc:
            failed = f"{worker.url} could not be reached ({exc.__class__.__name__})"
    raise server_error(f"{route} needs a decode instance: {failed}", status=503)
