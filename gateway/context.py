"""`Gateway`: the runtime state of one gateway app (no module globals: tests run several at once).

It owns the worker pool, the two policies, the upstream HTTP client, metrics, the known model ids,
the optional prompt counter, and background tasks (health checks, aborts).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from api.errors import server_error
from api.settings import GatewaySettings, Instance, Role

from .limits import PromptCounter
from .logs import log_event
from .metrics import GatewayMetrics
from .policies import Policy, RouteKey, make_policy
from .requests import RequestLimits
from .transport import node_transport
from .workers import Worker, WorkerPool

ABORT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Pair:
    """Where one attempt goes: a prefill instance (None: colocated) and a decode instance."""

    prefill: Worker | None
    decode: Worker


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.clock = clock
        self.pool = WorkerPool(settings.breaker_errors, settings.breaker_cooldown_s)
        self.policies: dict[Role, Policy] = {
            "prefill": make_policy(settings.prefill_policy, settings, self.rng),
            "decode": make_policy(settings.decode_policy, settings, self.rng),
        }
        for role, instances in (("prefill", settings.prefill), ("decode", settings.decode)):
            for instance in instances:
                self.pool.add(role, instance)  # type: ignore[arg-type]
        self.metrics = GatewayMetrics()
        self.models: frozenset[str] = frozenset()
        self.counter: PromptCounter | None = None
        self._client: httpx.AsyncClient | None = None
        self._transport: httpx.AsyncBaseTransport | None = None
        # (instance url, route) -> (parsed url, Host header)
        self._endpoints: dict[tuple[str, str], tuple[httpx.URL, str]] = {}
        self._request_headers = httpx.Headers()  # the client's defaults
        self._request_extensions: dict[str, Any] = {}  # the client's timeouts
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the gateway is not started (serve the app with its lifespan)")
        return self._client

    async def start(self) -> None:
        s = self.settings
        limits = httpx.Limits(
            max_connections=2 * s.max_inflight + 64, max_keepalive_connections=512
        )
        timeout = httpx.Timeout(s.request_timeout_s, connect=10.0)
        # NOTE: trust_env=False: a proxy from the environment must never sit between us and nodes.
        self._transport = node_transport(limits)
        self._client = httpx.AsyncClient(
            transport=self._transport, timeout=timeout, trust_env=False
        )
        self._request_headers = self._client.headers
        self._request_extensions = {"timeout": timeout.as_dict()}
        if s.tokenizer and (s.max_prompt_tokens is not None):
            self.counter = await asyncio.to_thread(PromptCounter.load, s.tokenizer)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def node_headers(self, rid: str, content_length: int) -> httpx.Headers:
        """The headers of a JSON POST to a node, as `client.build_request` makes them (Host
        aside: `node_request` adds it)."""
        headers = httpx.Headers(self._request_headers)
        headers["content-type"] = "application/json"
        headers["x-request-id"] = rid
        headers["content-length"] = str(content_length)
        return headers

    def node_request(
        self, base: str, route: str, content: bytes, headers: httpx.Headers
    ) -> httpx.Request:
        """A POST of `content` to instance `base`'s `route` with `headers` (`node_headers`) and
        the client's timeouts: what `client.build_request` makes, built for a hot path (the url
        parsed once per instance and route, the headers once per request)."""
        endpoint = self._endpoints.get((base, route))
        if endpoint is None:
            url = httpx.URL(base + route)
            endpoint = self._endpoints[(base, route)] = (url, url.netloc.decode("ascii"))
        url, host = endpoint
        headers = httpx.Headers(headers)
        headers["host"] = host
        return httpx.Request(
            "POST",
            url,
            headers=headers,
            stream=httpx.ByteStream(content),
            extensions=self._request_extensions,
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        """`request` on the node transport; the response's body is left to read (or close).

        NOTE: the hot path skips httpx's client layer (cookies, auth, redirects, event hooks):
        none applies between the gateway and its nodes, and it costs as much as the transport.
        """
        assert self._transport is not None, "the gateway is not started"
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` in the background, owned by the gateway (cancelled when it stops)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def limits(self) -> RequestLimits:
        s = self.settings
        return RequestLimits(s.max_tokens_limit, s.max_prompt_tokens, self.counter, self.models)

    def pick_pair(self, key: RouteKey, exclude: Iterable[str] = ()) -> Pair:
        """A pair for one attempt; 503 when a role has no instance that may take requests."""
        now, exclude = self.clock(), set(exclude)
        prefill = None
        if self.pool.has_prefill():
            prefill = self.policies["prefill"].pick(self._ready("prefill", now, exclude), key)
        decode = self.policies["decode"].pick(self._ready("decode", now, exclude), key)
        return Pair(prefill, decode)

    def _ready(self, role: Role, now: float, exclude: set[str]) -> list[Worker]:
        workers = self.pool.available(role, now, exclude)
        if not workers:
            raise server_error(
                f"no {role} instance can take requests now (all unhealthy or circuit-open; "
                "GET /workers shows them)",
                status=503,
                code="no_healthy_instance",
            )
        return workers

    def add_worker(self, role: Role, instance: Instance) -> Worker:
        worker = self.pool.add(role, instance)
        log_event(logging.WARNING, "worker_added", role=role, url=worker.url)
        return worker

    def remove_worker(self, url: str) -> Worker:
        worker = self.pool.remove(url)
        self._endpoints = {k: e for k, e in self._endpoints.items() if k[0] != worker.url}
        for policy in self.policies.values():
            policy.forget(worker.url)
        log_event(logging.WARNING, "worker_removed", role=worker.role, url=worker.url)
        return worker

    async def fetch_models(self) -> list[dict[str, Any]]:
        """Model cards of the healthy decode instances (first card per id); 503 when none answer."""
        workers = [w for w in self.pool.of_role("decode") if w.healthy]
        answers = await asyncio.gather(
            *(self.client.get(f"{w.url}/v1/models", timeout=10.0) for w in workers),
            return_exceptions=True,
        )
        cards: dict[str, dict[str, Any]] = {}
        answered = False
        for worker, answer in zip(workers, answers):
            listed = _model_cards(answer)
            if listed is None:
                log_event(logging.INFO, "models_failed", url=worker.url, error=repr(answer))
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

    async def abort(self, worker: Worker, rid: str) -> None:
        """Ask `worker` to drop request `rid` (best effort: a node that is gone has dropped it)."""
        try:
            await self.client.post(
                f"{worker.url}/abort_request",
                json={"rid": rid},
                headers={"x-request-id": rid},
                timeout=ABORT_TIMEOUT_S,
            )
        except httpx.HTTPError as exc:
            log_event(logging.INFO, "abort_failed", rid, url=worker.url, error=repr(exc))


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
