"""The gateway's stats line (gateway/stats_log.py): counts over the interval just ended, the
instances routable now, an idle gateway quiet; and the line in a real gateway's log."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from api.settings import GatewaySettings, Instance
from gateway.metrics import GatewayMetrics
from gateway.stats_log import GatewaySample, describe
from gateway.workers import WorkerPool

from .conftest import Harness
from .servers import wait_until

COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 3}


def fields(line: str) -> dict[str, str]:
    head, *pairs = line.split(" ")
    assert head == "stats"
    return dict(pair.split("=", 1) for pair in pairs)


def test_a_sample_adds_up_answers_by_class_and_counts_routable_instances() -> None:
    metrics = GatewayMetrics()
    for route, status in [("completions", 200)] * 3 + [("chat", 400), ("generate", 503)]:
        metrics.record(route, status, 0.1)
    metrics.retries, metrics.inflight = 2, 5
    metrics.ttft.observe(0.25)
    pool = WorkerPool(breaker_errors=3, breaker_cooldown_s=10.0)
    for port in (1, 2):
        pool.add("prefill", Instance(f"http://127.0.0.1:{port}", 8998))
    pool.add("decode", Instance("http://127.0.0.1:3"))
    pool.of_role("prefill")[1].take_out("health checks failed")
    got = GatewaySample.of(metrics, pool, now=0.0)
    assert got.instances == {"prefill": "1/2", "decode": "1/1"}
    assert got.in_flight == 5
    assert (got.totals["ok"], got.totals["client_errors"], got.totals["server_errors"]) == (3, 1, 1)
    assert (got.totals["retries"], got.totals["ttft_count"], got.totals["ttft_sum"]) == (2, 1, 0.25)


def sample(in_flight: int = 0, **totals: float) -> GatewaySample:
    zero = dict.fromkeys(
        ("ok", "client_errors", "server_errors", "retries", "migrations", "stream_errors",
         "prefill_fallbacks", "ttft_sum", "ttft_count"), 0.0,
    )  # fmt: skip
    return GatewaySample(zero | totals, in_flight, {"prefill": "2/2", "decode": "1/2"})


def test_the_line_counts_the_interval_and_an_idle_gateway_is_quiet() -> None:
    last = sample(ok=10, ttft_sum=1.0, ttft_count=10)
    now = sample(in_flight=3, ok=30, server_errors=2, retries=1, ttft_sum=7.0, ttft_count=30)
    assert fields(describe(last, now, 2.0) or "") == {
        "role": "gateway",
        "requests_s": "11.0",
        "in_flight": "3",
        "ok": "20",
        "client_errors": "0",
        "server_errors": "2",
        "retries": "1",
        "migrations": "0",
        "stream_errors": "0",
        "prefill_fallbacks": "0",
        "ttft_mean_ms": "300.0",
        "prefill": "2/2",
        "decode": "1/2",
    }
    assert describe(now, sample(ok=30, server_errors=2, retries=1, ttft_sum=7.0, ttft_count=30),
                    10.0) is None  # fmt: skip
    assert describe(last, sample(in_flight=1, ok=10, ttft_sum=1.0, ttft_count=10), 10.0)


def stats_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The stats lines among what was logged (other loggers may log at INFO too)."""
    return [r for r in caplog.records if r.name == "gateway.stats_log"]


def test_a_serving_gateway_logs_its_stats_line(
    harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = harness(prefill=1, decode=1, log_stats_interval_s=0.2)
    with caplog.at_level(logging.INFO, logger="gateway.stats_log"), h.client() as c:
        for _ in range(3):
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200

        def served_line() -> dict[str, str] | None:
            lines = [fields(r.getMessage()) for r in stats_records(caplog)]
            return next((f for f in lines if int(f["ok"]) > 0), None)

        got = wait_until(served_line, 10.0, "a stats line with the answers")
    assert got["role"] == "gateway" and (got["prefill"], got["decode"]) == ("1/1", "1/1")
    assert sum(int(fields(r.getMessage())["ok"]) for r in stats_records(caplog)) == 3


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="log_stats_interval_s must be >= 0, got -1"):
        GatewaySettings(log_stats_interval_s=-1)
