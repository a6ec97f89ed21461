"""Draining a node (SIGTERM, SIGINT): refuse new work at once, finish what it holds, then stop.

    serving --signal--> draining: /health and new generation requests answer 503 "draining"
                        (the gateway sends them elsewhere); requests in flight run on
    draining --every request ended--------------------------------------------+
    draining --drain_timeout_s ran out, or a second signal--> what is left ends |
                        with a "draining" error (an SSE error event once its     |
                        stream began, a 503 before) and is aborted on the        |
                        scheduler                                                v
    settled: the scheduler holds no request (or SETTLE_S passed); the HTTP server stops, then the
             scheduler process, and the node exits 0 (node/server.py)

A request is in flight from its handler's start until its `JobRun` closes (a stream's last
event): the handlers say when they run (`handling`), the runs track themselves (`track`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Protocol

from api.errors import ApiError, draining
from node.channel import SchedulerClient

log = logging.getLogger(__name__)

POLL_S = 0.05
CUT_WAIT_S = 5.0  # runs just cut close at their next output; one stuck writing is not waited on
SETTLE_S = 10.0  # for the scheduler to finish the aborts (a room's abort may wait on its peer)


class Cuttable(Protocol):
    """A request in flight that the drain can end (node.jobs.JobRun)."""

    def cut(self, error: ApiError) -> None: ...


class Drain:
    """One node's drain; `run()` it once, on the first signal."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self._handlers = 0
        self._runs: set[Cuttable] = set()
        self._cut: ApiError | None = None
        self._hurried = False

    @property
    def busy(self) -> bool:
        return self._handlers > 0 or bool(self._runs)

    def refusal(self) -> ApiError:
        """What new work gets while the node drains."""
        return draining("this node is draining (shutting down): send the request elsewhere")

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """A generation handler runs: in flight, even before its run exists."""
        self._handlers += 1
        try:
            yield
        finally:
            self._handlers -= 1

    def track(self, run: Cuttable) -> None:
        """`run` started; one that starts after the cut is cut at once."""
        self._runs.add(run)
        if self._cut is not None:
            run.cut(self._cut)

    def untrack(self, run: Cuttable) -> None:
        self._runs.discard(run)

    def hurry(self) -> None:
        """Stop waiting for the requests in flight: cut them now (a second signal)."""
        self._hurried = True

    async def run(self, scheduler: SchedulerClient) -> None:
        """Refuse new work, wait for what is in flight (up to `timeout_s`), cut what is left,
        and return once the scheduler holds no request."""
        self.draining = True
        log.warning(
            "draining: %d requests in flight, up to drain_timeout_s=%gs",
            len(self._runs),
            self.timeout_s,
        )
        if not await self._until_idle(self.timeout_s, hurry=True):
            why = "a second signal" if self._hurried else f"drain_timeout_s={self.timeout_s:g}s"
            self._cut = draining(f"this node shut down before the request could finish ({why})")
            log.warning("drain cut short by %s: ending %d requests", why, len(self._runs))
            for run in list(self._runs):
                run.cut(self._cut)
            await self._until_idle(CUT_WAIT_S)
        info = await self._settled(scheduler)
        fields = ("free_pages", "total_pages", "running", "waiting", "held", "quarantined")
        log.warning("drained: %s", " ".join(f"{k}={info[k]}" for k in fields if k in info))

    async def _until_idle(self, timeout_s: float, hurry: bool = False) -> bool:
        """True once nothing is in flight; False when `timeout_s` passes (or, with `hurry`, once
        `hurry()` was called)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.busy:
            left = deadline - loop.time()
            if left <= 0 or (hurry and self._hurried):
                return False
            await asyncio.sleep(min(POLL_S, left))
        return True

    async def _settled(self, scheduler: SchedulerClient) -> dict[str, Any]:
        """The scheduler's server_info once it holds no request (the aborts sent before this
        call reach it first: one channel); its last answer after SETTLE_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        info: dict[str, Any] = {}
        while True:
            with contextlib.suppress(TimeoutError):
                info = (await scheduler.call("server_info", timeout_s=SETTLE_S)).data
            if (info and not holds_requests(info)) or loop.time() > deadline:
                return info
            await asyncio.sleep(POLL_S)


def holds_requests(info: dict[str, Any]) -> bool:
    """Does a scheduler's server_info show a request it still works on? (A quarantined room's
    pages wait for time alone: no request is behind them.)"""
    keys = ("running", "waiting", "transferring", "prealloc")
    queued = sum(int(info.get(key, 0)) for key in keys)
    return queued > 0 or int(info.get("held", 0)) > int(info.get("quarantined", 0))
