"""Prometheus text for a node: request counts, latency histograms, and the scheduler's gauges."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from node.jobs import JobState
from node.settings import NodeSettings
from transfer import RoomStatus, room_outcome

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAUGES = {
    "free_pages": "KV pages not held by any request",
    "total_pages": "KV pages in the pool",
    "running": "requests in the running batch",
    "waiting": "requests waiting to be scheduled",
    "held": "requests holding pages outside the batch (PD transfer)",
    "prealloc": "decode: requests waiting for pages before their transfer",
    "transferring": "decode: requests whose KV is being written here",
    "quarantined": "decode: failed requests whose pages wait out transfer.quarantine_s",
}


# NOTE: prefill nodes count a request's first token, and both roles its prompt: sum by role
GENERATED = "Tokens generated for finished requests (a prefill node's: the first of each)."
ROOMS = (
    "KV transfer rooms ended, by how: success, declined (decode prefilled the request itself), "
    "aborted (by the client), failed."
)


def header(name: str, kind: str, text: str) -> list[str]:
    """The # HELP and # TYPE lines of the family pdserve_node_`name`."""
    return [f"# HELP pdserve_node_{name} {text}", f"# TYPE pdserve_node_{name} {kind}"]


class Histogram:
    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {self.total}")
        return out


TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class TransferStats:
    """The node's KV transfers, kept by its scheduler process (the loop sees each room end) and
    reported through server_info: rooms by outcome, bytes moved, each room's transfer time."""

    def __init__(self) -> None:
        self.rooms: Counter[str] = Counter()
        self.bytes = 0
        self.seconds = Histogram(TRANSFER_BUCKETS)

    def observe(self, status: RoomStatus) -> None:
        self.rooms[room_outcome(status)] += 1
        if status.metrics is not None:
            self.bytes += status.metrics.bytes
            self.seconds.observe(status.metrics.duration_s)

    def info(self) -> dict[str, Any]:
        h = self.seconds
        return {
            "rooms": dict(self.rooms),
            "bytes": self.bytes,
            "seconds": {"counts": h.counts, "total": h.total, "sum": h.sum},
        }


def transfer_lines(info: dict[str, Any], labels: str) -> list[str]:
    """/metrics lines of a TransferStats.info()."""
    lines = header("transfer_rooms_total", "counter", ROOMS)
    for state in ("success", "declined", "aborted", "failed"):
        n = info["rooms"].get(state, 0)
        lines.append(f'pdserve_node_transfer_rooms_total{{{labels},state="{state}"}} {n}')
    lines += header("transfer_bytes_total", "counter", "KV bytes moved by this node's rooms.")
    lines.append(f"pdserve_node_transfer_bytes_total{{{labels}}} {info['bytes']}")
    lines += header("transfer_seconds", "histogram", "Each room's KV transfer time.")
    seconds = Histogram(TRANSFER_BUCKETS)
    seconds.counts, seconds.total = list(info["seconds"]["counts"]), info["seconds"]["total"]
    seconds.sum = info["seconds"]["sum"]
    return lines + seconds.lines("pdserve_node_transfer_seconds", labels)


class NodeMetrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.ttft = Histogram()
        self.e2e = Histogram()
        self.tpot = Histogram(TPOT_BUCKETS)  # per request: (e2e - ttft) / (tokens - 1)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0

    def count(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def observe_first_token(self, ttft_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)

    def observe_done(self, ttft_s: float | None, e2e_s: float, states: Sequence[JobState]) -> None:
        self.observe_first_token(ttft_s)
        self.e2e.observe(e2e_s)
        for s in states:
            self.prompt_tokens += s.out.prompt_tokens
            self.generation_tokens += s.out.completion_tokens
            self.cached_tokens += s.out.cached_tokens
            if ttft_s is not None and s.out.completion_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (s.out.completion_tokens - 1))

    def render(self, info: dict[str, Any], settings: NodeSettings) -> str:
        labels = f'role="{settings.role}",name="{settings.name}"'
        lines = header("requests_total", "counter", "Generation requests answered, by HTTP status.")
        for (route, status), n in sorted(self.requests.items()):
            lines.append(
                f'pdserve_node_requests_total{{{labels},route="{route}",status="{status}"}} {n}'
            )
        for name, value, text in (
            ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
            ("generation_tokens_total", self.generation_tokens, GENERATED),
            (
                "cached_tokens_total",
                self.cached_tokens,
                "Prompt tokens read from the prefix cache.",
            ),
        ):
            lines += header(name, "counter", text)
            lines.append(f"pdserve_node_{name}{{{labels}}} {value}")
        for key, help_text in GAUGES.items():
            if key in info:
                metric = f"pdserve_node_{key}"
                lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
                lines.append(f"{metric}{{{labels}}} {info[key]}")
        for name, hist, text in (
            (
                "time_to_first_token_seconds",
                self.ttft,
                "From a request's arrival to its first token.",
            ),
            ("e2e_request_latency_seconds", self.e2e, "From a request's arrival to its end."),
            ("time_per_output_token_seconds", self.tpot, "Per request: after the first token."),
        ):
            lines += header(name, "histogram", text)
            lines += hist.lines(f"pdserve_node_{name}", labels)
        if "transfer" in info:
            lines += transfer_lines(info["transfer"], labels)
        if "started" in info:  # NOTE: changes() of it over a window counts restarts
            lines += header("start_time_seconds", "gauge", "When the node started (Unix time).")
            lines.append(f"pdserve_node_start_time_seconds{{{labels}}} {info['started']:.3f}")
        return "\n".join(lines) + "\n"
