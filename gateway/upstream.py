"""`Upstream`: every HTTP call the gateway makes to its nodes, on one connection pool.

The hot path (a generation POST to a prefill or decode node) skips httpx's client layer: `post`
builds the request as `client.build_request` would (the url parsed once per instance and route,
the headers once per attempt) and `send` hands it straight to the node transport
(`transport.NodeTransport`). The rest (aborts, health probes, /v1/models) goes through the httpx
client on that same transport.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

import httpx

from api.errors import DRAINING, server_error

from .logs import log_event
from .resolve import Resolve, system_resolve
from .transport import node_transport

ABORT_TIMEOUT_S = 5.0
MODELS_TIMEOUT_S = 10.0


class Probe(str, enum.Enum):
    """What an instance's `GET /health` said."""

    UP = "up"  # 200
    DRAINING = "draining"  # 503 {"status": "draining"}: shutting down, finishing its requests
    DOWN = "down"  # anything else, or no answer in time


class Upstream:
    def __init__(
        self, max_connections: int, request_timeout_s: float, resolve: Resolve = system_resolve
    ) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=512)
        timeout = httpx.Timeout(request_timeout_s, connect=10.0)
        self._transport = node_transport(limits, resolve)
        # NOTE: trust_env=False: a proxy from the environment must never sit between us and nodes.
        self.client = httpx.AsyncClient(transport=self._transport, timeout=timeout, trust_env=False)
        self._extensions: dict[str, Any] = {"timeout": timeout.as_dict()}
        # (instance url, route) -> (parsed url, Host header)
        self._endpoints: dict[tuple[str, str], tuple[httpx.URL, str]] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    def forget(self, url: str) -> None:
        """Drop what was cached for instance `url` (it left the pool)."""
        self._endpoints = {k: e for k, e in self._endpoints.items() if k[0] != url}

    # ---- the hot path: generation requests ----

    def headers(self, rid: str, content_length: int) -> httpx.Headers:
        """The headers of a JSON POST to a node, as `client.build_request` makes them (Host
        aside: `post` adds it)."""
        headers = httpx.Headers(self.client.headers)
        headers["content-type"] = "application/json"
        headers["x-request-id"] = rid
        headers["content-length"] = str(content_length)
        return headers

    def post(
        self,
        base: str,
        route: str,
        content: bytes,
        headers: httpx.Headers,
        read_timeout_s: float | None = None,
    ) -> httpx.Request:
        """A POST of `content` to instance `base`'s `route` with `headers` (see `headers`) and the
        client's timeouts (the read timeout replaced by `read_timeout_s` if given): what
        `client.build_request` makes, built for a hot path."""
        endpoint = self._endpoints.get((base, route))
        if endpoint is None:
            url = httpx.URL(base + route)
            endpoint = self._endpoints[(base, route)] = (url, url.netloc.decode("ascii"))
        url, host = endpoint
        headers = httpx.Headers(headers)
        headers["host"] = host
        extensions = self._extensions
        if read_timeout_s is not None:
            extensions = {"timeout": {**extensions["timeout"], "read": read_timeout_s}}
        return httpx.Request(
            "POST", url, headers=headers, stream=httpx.ByteStream(content), extensions=extensions
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        """`request` on the node transport; the response's body is left to read (or close).

        NOTE: the hot path skips httpx's client layer (cookies, auth, redirects, event hooks):
        none applies between the gateway and its nodes, and it costs as much as the transport.
        """
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response

    async def call(self, request: httpx.Request) -> httpx.Response:
        """`send`, with the whole body read (`response.content`) and the connection handed back."""
        response = await self.send(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    # ---- the rest ----

    async def abort(self, url: str, rid: str) -> None:
        """Ask instance `url` to drop request `rid` (best effort: a node that is gone dropped it)."""
        try:
            await self.client.post(
                f"{url}/abort_request",
                json={"rid": rid},
                headers={"x-request-id": rid},
                timeout=ABORT_TIMEOUT_S,
            )
        except httpx.HTTPError as exc:
            log_event(logging.INFO, "abort_failed", rid, url=url, error=repr(exc))

    async def probe(self, url: str, timeout_s: float) -> Probe:
        """What instance `url` answers `GET /health` within `timeout_s`."""
        try:
            answer = await self.client.get(f"{url}/health", timeout=timeout_s)
        except httpx.HTTPError:
            return Probe.DOWN
        if answer.status_code == 200:
            return Probe.UP
        return Probe.DRAINING if _says_draining(answer) else Probe.DOWN

    async def model_cards(
        self, urls: list[str], timeout_s: float = MODELS_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """The union of the instances' /v1/models cards (first card per id); 503 when none
        answers."""
        answers = await asyncio.gather(
            *(self.client.get(f"{url}/v1/models", timeout=timeout_s) for url in urls),
            return_exceptions=True,
        )
        cards: dict[str, dict[str, Any]] = {}
        answered = False
        for url, answer in zip(urls, answers):
            listed = _model_cards(answer)
            if listed is None:
                log_event(logging.INFO, "models_failed", url=url, error=repr(answer))
                continue
            answered = True
            for card in listed:
                cards.setdefault(card["id"], card)
        if not answered:
            raise server_error(
                "no decode instance answered /v1/models (GET /workers shows their health)",
                503,
                code="no_healthy_instance",
            )
        return list(cards.values())


def _says_draining(answer: httpx.Response) -> bool:
    """Is this a draining node's health answer (503 `{"status": "draining"}`)?"""
    if answer.status_code != 503:
        return False
    try:
        body = answer.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == DRAINING


def _model_cards(answer: httpx.Response | BaseException) -> list[dict[str, Any]] | None:
    """The cards of a /v1/models answer, None when it is not one."""
    if isinstance(answer, BaseException) or answer.status_code != 200:
        return None
    try:
        data = answer.json().get("data")
    except (ValueError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    return [card for card in data if isinstance(card, dict) and isinstance(card.get("id"), str)]
