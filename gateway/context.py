"""`Gateway`: the runtime state of one gateway app (no module globals: tests run several at once).

It owns the worker pool, the two policies, the upstream client (`Upstream`), metrics, the known
model ids, the optional prompt counter, and background tasks (health checks, aborts). Request
handling gets the pieces it needs from here; nothing below the routes holds the `Gateway`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from api.errors import server_error
from api.settings import GatewaySettings, Instance, Role

from .background import Background
from .limits import PromptCounter
from .logs import log_event
from .metrics import GatewayMetrics
from .policies import Policy, RouteKey, make_policy
from .requests import RequestLimits
from .resolve import Resolve, system_resolve
from .stats_log import GatewaySample
from .upstream import Upstream
from .workers import Pair, Worker, WorkerPool


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        resolve: Resolve = system_resolve,
    ) -> None:
        self.settings = settings
        self.resolve = resolve  # node host names -> addresses, on every new connection
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
        self.tasks = Background()
        self.falling_back = False  # PD mode, no prefill ready: decode instances prefill
        self._upstream: Upstream | None = None

    @property
    def upstream(self) -> Upstream:
        if self._upstream is None:
            raise RuntimeError("the gateway is not started (serve the app with its lifespan)")
        return self._upstream

    async def start(self) -> None:
        s = self.settings
        self._upstream = Upstream(2 * s.max_inflight + 64, s.request_timeout_s, self.resolve)
        if s.tokenizer and (s.max_prompt_tokens is not None):
            self.counter = await asyncio.to_thread(PromptCounter.load, s.tokenizer)

    async def stop(self) -> None:
        await self.tasks.cancel_all()
        if self._upstream is not None:
            await self._upstream.aclose()

    def stats_sample(self) -> GatewaySample:
        """What the stats line (gateway/stats_log.py) reads: metrics, instances, now."""
        return GatewaySample.of(self.metrics, self.pool, self.clock())

    def limits(self) -> RequestLimits:
        s = self.settings
        return RequestLimits(
            s.max_tokens_limit, s.max_prompt_tokens, self.counter, self.models,
            s.max_grammar_bytes, s.max_sequences,
        )  # fmt: skip

    def pick_pair(
        self, key: RouteKey, exclude: Iterable[str] = (), colocated: bool = False
    ) -> Pair:
        """A pair for one attempt; 503 when a role has no instance that may take requests.

        The pair is colocated (no prefill: the decode instance prefills) when the request asks
        it (`Prepared.colocated`), and in PD mode, where `prefill_fallback` allows it, when no
        prefill instance is ready or every ready one failed this request already (in
        `exclude`: they died before the health checks could take them out)."""
        now, exclude = self.clock(), set(exclude)
        prefill = None
        if self.pool.has_prefill() and not colocated:
            ready = self.pool.available("prefill", now)
            fallback = self.settings.prefill_fallback
            if fallback:
                self._note_fallback(not ready)
            if fallback and all(w.url in exclude for w in ready):
                self.metrics.prefill_fallbacks += 1
            else:
                prefill = self.policies["prefill"].pick(self._ready("prefill", now, exclude), key)
        decode = self.policies["decode"].pick(self._ready("decode", now, exclude), key)
        return Pair(prefill, decode)

    def _note_fallback(self, on: bool) -> None:
        """Log when no prefill instance is ready any more, and when one is again."""
        if on == self.falling_back:
            return
        self.falling_back = on
        # NOTE: "on": no prefill instance can take requests, so decode instances prefill them
        log_event(logging.WARNING, "prefill_fallback", state="on" if on else "off")

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
        if self._upstream is not None:
            self._upstream.forget(worker.url)
        for policy in self.policies.values():
            policy.forget(worker.url)
        log_event(logging.WARNING, "worker_removed", role=worker.role, url=worker.url)
        return worker

    async def fetch_models(
        self, urls: list[str] | None = None, timeout_s: float | None = None
    ) -> list[dict[str, Any]]:
        """Model cards of the healthy decode instances (or of `urls`; first card per id); 503
        when none answer."""
        if urls is None:
            urls = [w.url for w in self.pool.of_role("decode") if w.healthy]
        if timeout_s is None:
            return await self.upstream.model_cards(urls)
        return await self.upstream.model_cards(urls, timeout_s)
