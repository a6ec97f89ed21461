"""One request's bookkeeping at the gateway: its in-flight slot, metrics and closing log line."""

from __future__ import annotations

import logging
from collections.abc import Callable

from api.errors import rate_limited

from .logs import log_event
from .metrics import GatewayMetrics


class Tracker:
    def __init__(
        self, metrics: GatewayMetrics, route: str, rid: str, clock: Callable[[], float]
    ) -> None:
        self.metrics = metrics
        self.route = route
        self.rid = rid
        self.clock = clock
        self.started = clock()
        self._admitted = False
        self._finished = False
        self._first_seen = False

    def admit(self, max_inflight: int) -> None:
        """Take an in-flight slot, or raise the 429 that says to come back later."""
        if self.metrics.inflight >= max_inflight:
            raise rate_limited(
                f"the gateway has {max_inflight} requests in flight, its limit "
                "(retry after the Retry-After seconds, or raise gateway.max_inflight)"
            )
        self.metrics.inflight += 1
        self._admitted = True

    def first_event(self) -> None:
        if not self._first_seen:
            self._first_seen = True
            self.metrics.ttft.observe(self.clock() - self.started)

    def stream_failed(self) -> None:
        """The stream broke after events reached the client (it ends in an error event)."""
        self.metrics.stream_errors += 1

    def finish(self, status: int) -> None:
        """The response is over (sent, failed or abandoned); only the first call counts."""
        if self._finished:
            return
        self._finished = True
        if self._admitted:
            self.metrics.inflight -= 1
        elapsed = self.clock() - self.started
        self.metrics.record(self.route, status, elapsed)
        level = logging.INFO if status < 500 else logging.WARNING
        log_event(
            level,
            "request_done",
            self.rid,
            route=self.route,
            status=status,
            seconds=f"{elapsed:.3f}",
        )
