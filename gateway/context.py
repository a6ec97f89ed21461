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
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)
        if s.tokenizer and (s.max_prompt_tokens is not None):
            self.counter = await asyncio.to_thread(PromptCounter.load, s.tokenizer)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

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
