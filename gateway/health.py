"""Periodic health checks: `GET /health` on every instance each `health_interval_s`.

An instance failing `health_failures` checks in a row is taken out of routing; one passing check
puts it back. Each round also refreshes the served model ids from the decode instances.
"""

from __future__ import annotations

import asyncio
import logging

from .context import Gateway
from .logs import log_event
from .workers import Worker


class HealthMonitor:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        interval = gw.settings.health_interval_s
        self.timeout_s = max(1.0, min(5.0, interval))

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.gw.settings.health_interval_s)

    async def check_all(self) -> None:
        workers = self.gw.pool.all()
        results = await asyncio.gather(*(self.probe(w) for w in workers))
        for worker, ok in zip(workers, results):
            self.record(worker, ok)
        await self.refresh_models()

    async def probe(self, worker: Worker) -> bool:
        return await self.gw.upstream.probe(worker.url, self.timeout_s)

    def record(self, worker: Worker, ok: bool) -> None:
        if ok:
            worker.failed_checks = 0
            if worker.take_back():
                log_event(logging.WARNING, "instance_back", role=worker.role, url=worker.url)
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

    async def refresh_models(self) -> None:
        try:
            cards = await self.gw.fetch_models()
        except Exception:  # NOTE: keep the last known ids; routing does not depend on them
            return
        self.gw.models = frozenset(card["id"] for card in cards)
