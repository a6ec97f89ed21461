"""Membership at run time, behind the admin key: `GET /workers` lists, `POST /workers` adds
(`{"role", "url", "bootstrap_port"}`), `DELETE /workers` (`{"url"}`) or `DELETE /workers/{url}`
removes. Without an admin key configured these routes answer 403."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.errors import ApiError, invalid_request, not_found
from api.http import error_response, parse_json, read_body, request_id
from api.settings import Instance

from .context import Gateway
from .limits import check_admin_key
from .routes import gateway_of
from .upstream import Probe
from .workers import ROLES

MAX_ADMIN_BODY = 64 * 1024
NOT_CHECKED = "added, not checked yet"  # a new instance's reason to be out of routing


async def workers(request: Request) -> Response:
    gw, rid = gateway_of(request), request_id(request.headers)
    try:
        check_admin_key(request.headers, gw.settings.admin_key)
        if request.method == "GET":
            return _listing(request)
        body = parse_json(await read_body(request, MAX_ADMIN_BODY))
        if request.method == "POST":
            return await _add(request, body)
        return _remove(request, _url_of(body))
    except ApiError as exc:
        return error_response(exc, rid)


async def worker_by_url(request: Request) -> Response:
    """DELETE /workers/{url} (the url percent-encoded, or written out after the slash)."""
    gw, rid = gateway_of(request), request_id(request.headers)
    try:
        check_admin_key(request.headers, gw.settings.admin_key)
        return _remove(request, unquote(request.path_params["url"]))
    except ApiError as exc:
        return error_response(exc, rid)


def _listing(request: Request) -> Response:
    gw = gateway_of(request)
    now = gw.clock()
    return JSONResponse({"workers": [w.describe(now) for w in gw.pool.all()]})


async def _add(request: Request, body: dict[str, Any]) -> Response:
    """Add the instance, out of routing until its /health answers 200 (checked at once, then
    by the health rounds); refused (409) when it answers and serves none of the models the
    other instances serve."""
    gw = gateway_of(request)
    role = body.get("role")
    if role not in ROLES:
        raise invalid_request(f"role must be one of {', '.join(ROLES)} (got {role!r})", "role")
    port = body.get("bootstrap_port")
    if port is not None and (type(port) is not int or not 0 < port < 65536):
        raise invalid_request(
            f"bootstrap_port must be a port number (got {port!r})", "bootstrap_port"
        )
    if role == "prefill" and port is None:
        # NOTE: decode fetches a prefill's KV through its bootstrap server; without the port
        # every request paired with this prefill would fail
        raise invalid_request(
            "a prefill worker needs its bootstrap_port (its prefill entry's bootstrap_port in "
            "the cluster config; the node's /get_server_info shows it)",
            "bootstrap_port",
        )
    try:
        worker = gw.add_worker(role, Instance(_url_of(body), port))
    except ValueError as exc:
        raise invalid_request(str(exc), "url") from None
    except KeyError as exc:
        raise ApiError(409, exc.args[0], param="url", code="worker_exists") from None
    worker.take_out(NOT_CHECKED)
    if await gw.upstream.probe(worker.url, gw.settings.health_timeout_s) is Probe.UP:
        other = await _other_models(gw, worker.url)
        if other is not None:
            gw.remove_worker(worker.url)
            raise ApiError(409, other, param="url", code="model_mismatch")
        worker.take_back()
    return JSONResponse(worker.describe(gw.clock()), status_code=201)


async def _other_models(gw: Gateway, url: str) -> str | None:
    """Why the instance at `url` does not fit: it serves none of the gateway's models (None:
    it does, or it lists none within the health timeout, or the gateway knows none yet)."""
    if not gw.models:
        return None
    try:
        cards = await gw.fetch_models([url], gw.settings.health_timeout_s)
    except ApiError:
        return None
    served = {card["id"] for card in cards}
    if served & gw.models:
        return None
    return (
        f"{url} serves {', '.join(sorted(served))}, not the gateway's "
        f"{', '.join(sorted(gw.models))}"
    )


def _remove(request: Request, url: str) -> Response:
    gw = gateway_of(request)
    try:
        worker = gw.remove_worker(url)
    except (KeyError, ValueError) as exc:
        raise not_found(str(exc.args[0]), param="url", code="worker_not_found") from None
    return JSONResponse(worker.describe(gw.clock()))


def _url_of(body: dict[str, Any]) -> str:
    url = body.get("url")
    if not isinstance(url, str) or not url:
        raise invalid_request("url must be the instance's http://host:port", "url")
    return url
