"""The HTTP helpers every Starlette app of ours shares (the gateway's and the nodes'), written once.

request_id(headers)            the client's X-Request-Id when sane, else a fresh one
error_response(error, rid)     an `ApiError` as OpenAI's JSON error (with X-Request-Id)
read_body / parse_json         a bounded body (413) and a JSON object out of it (400)
ClientWatch, until_disconnect  notice a client leaving while its answer is being made
openai_http_errors(served)     Starlette's own 404/405 in OpenAI's shape
version(request)               GET /version: the installed pdserve's version (vLLM's route)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import Receive

from .errors import ApiError, invalid_request, too_large
from .openapi import docs_page

T = TypeVar("T")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(headers: Mapping[str, str]) -> str:
    """The X-Request-Id header when it is a sane token (it lands in logs), else a fresh one."""
    given = headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def error_response(error: ApiError, rid: str | None) -> JSONResponse:
    """`error` in OpenAI's shape, with its own headers and X-Request-Id when `rid` is given."""
    headers = dict(error.headers)
    if rid:
        headers["X-Request-Id"] = rid
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# ---- the request body ----


async def read_body(request: Request, max_bytes: int, *, setting: str | None = None) -> bytes:
    """The request body, or a 413 once it is known to exceed `max_bytes` (its message names
    `setting`, the option that raises the limit, when given)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _body_too_large(int(declared), max_bytes, setting)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _body_too_large(size, max_bytes, setting)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(size: int, max_bytes: int, setting: str | None) -> ApiError:
    fix = f"send a shorter request, or raise {setting}" if setting else "send a shorter request"
    return too_large(
        f"request body of {size} bytes or more is over this server's limit of {max_bytes} bytes "
        f"({fix})"
    )


def parse_json(body: bytes) -> dict[str, Any]:
    """`body` as a JSON object; a 400 saying what is wrong otherwise."""
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise invalid_request(f"could not parse the JSON body of the request: {exc}") from None
    if not isinstance(value, dict):
        raise invalid_request(f"the request body must be a JSON object, not {type(value).__name__}")
    return value


# ---- a client leaving ----


class ClientGone(Exception):
    """The client disconnected before its response began."""


async def wait_disconnect(receive: Receive) -> None:
    """Return once `receive` says `http.disconnect` (read it only after the body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientWatch:
    """One request's watch for its client leaving: a task reading `receive` until
    `http.disconnect`, started when first needed (after the request body was read) and shared by
    the time before the response and the stream (one task per request, not one per phase)."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self._task: asyncio.Future[None] | None = None

    @property
    def gone(self) -> bool:
        return self._task is not None and self._task.done() and not self._task.cancelled()

    def cancel_on_leave(self, task: asyncio.Future[Any]) -> Callable[[], None]:
        """Cancel `task` when the client leaves; returns the function that stops this."""
        if self._task is None:
            self._task = asyncio.ensure_future(wait_disconnect(self.receive))

        def cancel(_: asyncio.Future[None]) -> None:
            task.cancel()

        watcher = self._task
        watcher.add_done_callback(cancel)
        return lambda: watcher.remove_done_callback(cancel)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def until_disconnect(watch: ClientWatch, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result; if the client leaves first, it is cancelled and `ClientGone` raised."""
    task = asyncio.ensure_future(awaitable)
    forget = watch.cancel_on_leave(task)
    try:
        return await task
    except asyncio.CancelledError:
        if watch.gone and task.cancelled():
            raise ClientGone() from None
        raise
    finally:
        forget()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# ---- Starlette's own errors ----

ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


def openai_http_errors(served: str) -> ExceptionHandler:
    """A handler for Starlette's `HTTPException` (its 404/405) answering in OpenAI's shape; the
    message names `served`, the routes this app answers (e.g. "/v1/completions, /health")."""

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = f"{request.method} {request.url.path}: {exc.detail} (this server serves {served})"
        error = ApiError(exc.status_code, message, code=status_code_name(exc.status_code))
        return error_response(error, request_id(request.headers))

    return handle


def status_code_name(status: int) -> str:
    """A string `code` for an HTTP status: 404 -> "not_found", 405 -> "method_not_allowed"."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "http_error"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


def openapi_json(
    document: dict[str, Any] | Callable[[], dict[str, Any]],
) -> Callable[[Request], Awaitable[Response]]:
    """GET /openapi.json: `document` (built once, api/openapi.py), or what a callable makes of
    it at each request (the gateway names the models it serves)."""

    async def endpoint(_request: Request) -> Response:
        return JSONResponse(document() if callable(document) else document)

    return endpoint


def docs(document: dict[str, Any]) -> Callable[[Request], Awaitable[Response]]:
    """GET /docs: Swagger UI over /openapi.json."""
    page = docs_page(str(document["info"]["title"]))

    async def endpoint(_request: Request) -> Response:
        return HTMLResponse(page)

    return endpoint


async def version(_request: Request) -> Response:
    """`{"version": ...}`: the installed pdserve's version, as vLLM's GET /version answers."""
    try:
        installed = importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:
        installed = "unknown"  # NOTE: run from a checkout without `pip install -e .`
    return JSONResponse({"version": installed})
