"""The gateway's stats line: every `log_stats_interval_s`, while requests come or are in flight,
one INFO line of what it answered and where its instances stand, as a node logs its own
(node/stats_log.py):

    stats role=gateway requests_s=12.4 in_flight=8 ok=124 client_errors=0 server_errors=1
    retries=2 migrations=0 stream_errors=0 prefill_fallbacks=0 ttft_mean_ms=212.0
    prefill=2/2 decode=1/2                                        (one line in the log)

Counts are of the interval just ended (`ok`: 2xx answers, `client_errors`: 4xx, `server_errors`:
5xx), `in_flight` and the instances (routable / known, by role) are now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from api.periodic_log import PeriodicLine, key_values

from .metrics import GatewayMetrics
from .workers import ROLES, WorkerPool

log = logging.getLogger(__name__)

TICK_S = 1.0  # how often the task looks (the line comes at most once per interval)


@dataclass(frozen=True)
class GatewaySample:
    totals: dict[str, float]  # running totals: answers by class, retries, ..., TTFT sum and count
    in_flight: int
    instances: dict[str, str]  # role -> "routable/known"

    @classmethod
    def of(cls, metrics: GatewayMetrics, pool: WorkerPool, now: float) -> GatewaySample:
        answers = {"ok": 0, "client_errors": 0, "server_errors": 0}
        for (_route, status), count in metrics.requests.items():
            kind = "ok" if status < 400 else "client_errors" if status < 500 else "server_errors"
            answers[kind] += count
        totals = {
            **answers,
            "retries": metrics.retries,
            "migrations": metrics.migrations,
            "stream_errors": metrics.stream_errors,
            "prefill_fallbacks": metrics.prefill_fallbacks,
            "ttft_sum": metrics.ttft.sum,
            "ttft_count": metrics.ttft.count,
        }
        instances = {}
        for role in ROLES:
            workers = pool.of_role(role)
            routable = sum(w.available(now) for w in workers)
            instances[role] = f"{routable}/{len(workers)}"
        return cls(totals, metrics.inflight, instances)


def describe(last: GatewaySample, now: GatewaySample, elapsed: float) -> str | None:
    """The line for the interval from `last` to `now`; None when no request came or ended and
    none is in flight."""
    done = {k: v - last.totals.get(k, 0) for k, v in now.totals.items()}
    if not any(done.values()) and now.in_flight == 0:
        return None
    answered = done["ok"] + done["client_errors"] + done["server_errors"]
    ttft = done["ttft_sum"] / done["ttft_count"] * 1000 if done["ttft_count"] else 0.0
    counts = ("ok", "client_errors", "server_errors", "retries", "migrations", "stream_errors")
    fields: dict[str, object] = {
        "role": "gateway",
        "requests_s": f"{answered / elapsed:.1f}",
        "in_flight": now.in_flight,
        **{k: int(done[k]) for k in (*counts, "prefill_fallbacks")},
        "ttft_mean_ms": f"{ttft:.1f}",
        **now.instances,
    }
    return key_values("stats", fields)


async def log_stats(
    interval_s: float,
    take: Callable[[], GatewaySample],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """The gateway's background task (returns at once for an interval of 0)."""
    if interval_s <= 0:
        return
    line = PeriodicLine(interval_s, describe, log, clock)
    while True:
        line.tick(take)
        await asyncio.sleep(min(TICK_S, interval_s))
