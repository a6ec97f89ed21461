"""Periodic health checks: `GET /health` on every instance each `health_interval_s`, each given
`health_timeout_s` to answer.

An instance failing `health_failures` checks in a row is taken out of routing; one that says it is
draining (503 `{"status": "draining"}`: it shuts down and finishes what it holds) is taken out at
once, with no failure counted. One passing check puts it back, its breaker closed. Each round
also refreshes the served model ids from the decode instances.
"""

from __future__ import annotations

import asyncio
import logging

from api.errors import DRAINING

from .context import Gateway
from .logs import log_event
from .upstream import Probe
from .workers import Worker


class HealthMonitor:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.gw.settings.health_interval_s)

    async def check_all(self) -> None:
        workers = self.gw.pool.all()
        results = await asyncio.gather(*(self.probe(w) for w in workers))
        for worker, probe in zip(workers, results):
            self.record(worker, probe)
        # NOTE: only from decode instances that just answered, and no slower than a probe: an
        # instance that hangs must not hold up the next round (the round that takes it out)
        answered = [w.url for w, p in zip(workers, results) if w.role == "decode" and p is Probe.UP]
        await self.refresh_models(answered)

    async def probe(self, worker: Worker) -> Probe:
        return await self.gw.upstream.probe(worker.url, self.gw.settings.health_timeout_s)

    def record(self, worker: Worker, probe: Probe) -> None:
        if probe is Probe.UP:
            worker.failed_checks = 0
            if worker.take_back():
                log_event(logging.WARNING, "instance_back", role=worker.role, url=worker.url)
            return
        if probe is Probe.DRAINING:
            worker.failed_checks = 0  # NOTE: the node is fine, only leaving
            if worker.take_out(DRAINING):
                log_event(
                    logging.WARNING,
                    "instance_out",
                    role=worker.role,
                    url=worker.url,
                    reason=DRAINING,
                )
            return
        worker.failed_checks += 1
        if worker.healthy and worker.failed_checks >= self.gw.settings.health_failures:
            worker.take_out("health checks failed")
            log_event(
                logging.WARNING,
                "instance_out",
                role=worker.role,
                url=worker.url,
                failed_checks=worker.failed_checks,
            )

    async def refresh_models(self, urls: list[str]) -> None:
        if not urls:
            return
        try:
            cards = await self.gw.fetch_models(urls, self.gw.settings.health_timeout_s)
        except Exception:  # NOTE: keep the last known ids; routing does not depend on them
            return
        self.gw.models = frozenset(card["id"] for card in cards)
