"""A node's stats line, as vLLM and SGLang print theirs: every `log_stats_interval_s`, while the
node has work, its scheduler process logs at INFO what it holds and what it did, key=value:

    stats role=decode running=12 waiting=3 held=2 prealloc=0 transferring=2 quarantined=0
    prompt_tok_s=812.4 gen_tok_s=143.0 kv_usage=41.2% prefix_hit=12.5% transfers_ok=10
    transfers_failed=0                                                   (one line in the log)

The counts of requests and kv_usage are the scheduler's now (the gauges /metrics exports, read
from `server_info`); rates, the prefix cache's hit rate and the transfers that ended are over
the interval just ended. An interval in which nothing happened and nothing is held logs nothing,
so an idle node stays quiet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from api.periodic_log import PeriodicLine, key_values
from engine.counters import StepCounters
from node.metrics import GAUGES

log = logging.getLogger(__name__)

POOL_GAUGES = ("free_pages", "total_pages")  # the line shows them as kv_usage


@dataclass(frozen=True)
class StatsSample:
    """One look at the scheduler: its gauges now, and its running totals."""

    gauges: dict[str, int]  # running, waiting, held, then the role's own (GAUGES' order)
    kv_usage: float  # the share of KV pages that requests hold
    totals: dict[str, int]  # StepCounters' fields, transfers_ok, transfers_failed

    @classmethod
    def of(cls, info: Mapping[str, Any], counters: StepCounters) -> StatsSample:
        """From a loop's `server_info()` and its engine's counters."""
        gauges = {k: info[k] for k in GAUGES if k in info and k not in POOL_GAUGES}
        total = info["total_pages"]
        kv_usage = 1 - info["free_pages"] / total if total else 0.0
        rooms = info.get("transfer", {}).get("rooms", {})
        transfers = {
            "transfers_ok": rooms.get("success", 0),
            "transfers_failed": rooms.get("failed", 0),
        }
        return cls(gauges, kv_usage, {**asdict(counters), **transfers})


class StatsLog(PeriodicLine[StatsSample]):
    """Ticked once per loop iteration; a tick costs a clock read until the interval is up."""

    def __init__(
        self, role: str, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(interval_s, self.line, log, clock)
        self.role = role

    def line(self, last: StatsSample, now: StatsSample, elapsed: float) -> str | None:
        """The line for an interval of `elapsed` seconds from `last` to `now`; None if idle."""
        done = {k: v - last.totals.get(k, 0) for k, v in now.totals.items()}
        if not any(done.values()) and not any(now.gauges.values()):
            return None
        queried = done["prefix_queried"]
        fields = {
            "role": self.role,
            **now.gauges,
            "prompt_tok_s": f"{done['prompt_tokens'] / elapsed:.1f}",
            "gen_tok_s": f"{done['generated_tokens'] / elapsed:.1f}",
            "kv_usage": f"{100 * now.kv_usage:.1f}%",
            "prefix_hit": f"{100 * done['prefix_hit'] / queried if queried else 0:.1f}%",
            "transfers_ok": done["transfers_ok"],
            "transfers_failed": done["transfers_failed"],
        }
        return key_values("stats", fields)
