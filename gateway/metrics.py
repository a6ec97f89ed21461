"""The gateway's Prometheus metrics, written as the text exposition format (version 0.0.4).

Counters and histograms live in one `GatewayMetrics` per app; per-instance gauges are read from
the worker pool when scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable

from .workers import Worker

PREFIX = "pdserve_gateway"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status)
        self.retries = 0
        self.migrations = 0  # streams moved to another pair mid-stream
        self.stream_errors = 0  # streams that ended in an error event
        self.draining_refusals = 0  # attempts a draining instance turned away
        self.prefill_fallbacks = 0  # PD-mode attempts a decode instance prefilled (no prefill)
        self.inflight = 0
        self.ttft = Histogram()
        self.latency = Histogram()

    def record(self, route: str, status: int, latency_s: float) -> None:
        self.requests[(route, status)] += 1
        self.latency.observe(latency_s)

    def render(self, workers: Iterable[Worker], now: float) -> str:
        lines = self._request_lines()
        lines += self._instance_lines(list(workers), now)
        return "\n".join(lines) + "\n"

    def _request_lines(self) -> list[str]:
        p = PREFIX
        lines = [f"# HELP {p}_requests_total Requests answered, by route and HTTP status."]
        lines.append(f"# TYPE {p}_requests_total counter")
        for (route, status), count in sorted(self.requests.items()):
            lines.append(f"{p}_requests_total{_labels(route=route, status=str(status))} {count}")
        lines += _scalar("inflight_requests", "gauge", "Requests in flight.", self.inflight)
        lines += _scalar(
            "retries_total", "counter", "Attempts retried on a new pair.", self.retries
        )
        lines += _scalar(
            "stream_errors_total", "counter", "Streams ended by an error.", self.stream_errors
        )
        lines += _scalar(
            "migrations_total",
            "counter",
            "Streams moved to another pair after their decode node failed mid-stream.",
            self.migrations,
        )
        lines += _scalar(
            "draining_refusals_total",
            "counter",
            "Attempts an instance refused because it was draining (taken out, not a breaker error).",
            self.draining_refusals,
        )
        lines += _scalar(
            "prefill_fallbacks_total",
            "counter",
            "Attempts sent to a decode instance to prefill itself, no prefill instance being ready.",
            self.prefill_fallbacks,
        )
        for name, hist, text in (
            ("time_to_first_token_seconds", self.ttft, "Time to the first streamed event."),
            ("request_duration_seconds", self.latency, "Time to the end of the response."),
        ):
            lines += [f"# HELP {p}_{name} {text}", f"# TYPE {p}_{name} histogram"]
            lines += hist.lines(f"{p}_{name}")
        return lines

    def _instance_lines(self, workers: list[Worker], now: float) -> list[str]:
        gauges = (
            ("instance_outstanding_requests", "Requests in flight per instance.", "outstanding"),
            ("instance_outstanding_tokens", "Estimated tokens in flight.", "outstanding_tokens"),
            ("instance_healthy", "1 while the instance passes health checks.", "healthy"),
        )
        lines = []
        for name, text, attr in gauges:
            lines += [f"# HELP {PREFIX}_{name} {text}", f"# TYPE {PREFIX}_{name} gauge"]
            for w in workers:
                value = int(getattr(w, attr))
                lines.append(f"{PREFIX}_{name}{_labels(role=w.role, url=w.url)} {value}")
        name = f"{PREFIX}_instance_breaker_open"
        lines += [f"# HELP {name} 1 while the circuit breaker is open.", f"# TYPE {name} gauge"]
        for w in workers:
            lines.append(f"{name}{_labels(role=w.role, url=w.url)} {int(w.is_open(now))}")
        return lines


def _scalar(name: str, kind: str, text: str, value: float) -> list[str]:
    full = f"{PREFIX}_{name}"
    return [f"# HELP {full} {text}", f"# TYPE {full} {kind}", f"{full} {value}"]
