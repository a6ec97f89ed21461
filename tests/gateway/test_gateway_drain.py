"""A draining node, as the gateway sees it (against stand-in upstreams): its health check takes it
out at once, and its 503 "draining" refusal is retried on another pair, taking it out without
counting against its circuit breaker. And the health checks' own pace: a node that stops
answering is out within a few seconds by default."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from api.settings import GatewaySettings, Instance
from gateway.breaker import BreakerState
from gateway.context import Gateway
from gateway.health import HealthMonitor
from gateway.upstream import Probe
from gateway.workers import Worker

from .conftest import Harness
from .servers import wait_until

COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
STREAM = {**COMPLETION, "stream": True}


def worker_of(h: Harness, name: str) -> Worker:
    url = h.upstreams[name].url
    return next(w for w in h.gw.pool.all() if w.url == url)


def first_checks_done(h: Harness) -> None:
    """The gateway's first round of health checks is over (its last step fills the model ids),
    so that none of its answers can take back an instance the test saw taken out."""
    wait_until(lambda: h.gw.models, what="the first health checks")


def assert_left_alone(h: Harness, worker: Worker) -> None:
    """Out of routing because it drains, its breaker untouched."""
    assert not worker.healthy and worker.out_reason == "draining"
    assert worker.failed_checks == 0
    assert worker.breaker.errors == 0 and worker.breaker.state(h.gw.clock()) is BreakerState.CLOSED


def test_a_draining_health_answer_takes_the_instance_out_at_once(
    harness: Callable[..., Harness],
) -> None:
    # NOTE: far more failures than the test could see: only "draining" can take d0 out
    h = harness(prefill=0, decode=2, health_interval_s=0.05, health_failures=1000)
    leaving = worker_of(h, "d0")
    h.decode[0].behavior.draining = True
    wait_until(lambda: not leaving.healthy, what="d0 taken out")
    assert_left_alone(h, leaving)
    with h.client() as c:
        for _ in range(4):
            assert c.post("/v1/completions", json=COMPLETION).json()["node"] == "d1"
    h.decode[0].behavior.draining = False  # restarted: it answers 200 again
    wait_until(lambda: leaving.healthy, what="d0 back")


def test_a_draining_decode_refusal_is_retried_without_a_breaker_error(
    harness: Callable[..., Harness],
) -> None:
    h = harness(prefill=1, decode=2, decode_policy="round_robin", breaker_errors=1)
    h.decode[0].behavior.mode = "draining"
    leaving = worker_of(h, "d0")
    first_checks_done(h)
    with h.client() as c:
        for body in (COMPLETION, STREAM, COMPLETION, STREAM):
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            if body.get("stream"):
                first = next(line for line in r.text.splitlines() if line.startswith("data: "))
                assert json.loads(first[len("data: ") :])["node"] == "d1"
            else:
                assert r.json()["node"] == "d1"
        metrics = c.get("/metrics").text
    assert len(h.decode[0].received) == 1  # round robin tried it once; then it was out
    assert_left_alone(h, leaving)
    assert h.gw.metrics.retries == 1
    assert "pdserve_gateway_draining_refusals_total 1" in metrics


def test_a_draining_prefill_refusal_is_retried_without_a_breaker_error(
    harness: Callable[..., Harness],
) -> None:
    h = harness(prefill=2, decode=1, prefill_policy="round_robin", breaker_errors=1)
    h.prefill[0].behavior.mode = "draining"
    h.decode[0].behavior.after = h.prefill  # decode waits for the KV; prefill refuses first
    leaving = worker_of(h, "p0")
    first_checks_done(h)
    with h.client() as c:
        for _ in range(3):
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(h.prefill[0].received) == 1
    assert len(h.prefill[1].received) == 3
    assert_left_alone(h, leaving)
    assert h.gw.metrics.draining_refusals == 1


def test_every_instance_draining_is_a_502_naming_it(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=2)
    for d in h.decode:
        d.behavior.mode = "draining"
    first_checks_done(h)
    with h.client() as c:
        r = c.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "draining" and "draining" in error["message"]
    assert all(not w.healthy for w in h.gw.pool.all())


# ---- the pace of health checks ---------------------------------------------------------------


def test_a_silent_instance_is_out_within_seconds_by_default() -> None:
    s = GatewaySettings()
    # a check fails after health_timeout_s; the next starts health_interval_s later
    worst = s.health_failures * (s.health_interval_s + s.health_timeout_s)
    assert worst <= 5.0 and s.health_timeout_s > s.health_interval_s


def test_a_check_waits_health_timeout_s() -> None:
    settings = GatewaySettings(decode=(Instance("http://d:1"),), health_timeout_s=0.25)
    gw = Gateway(settings)
    asked: list[tuple[str, float]] = []

    async def probe(url: str, timeout_s: float) -> Probe:
        asked.append((url, timeout_s))
        return Probe.DOWN

    async def check() -> None:
        await gw.start()
        gw.upstream.probe = probe  # type: ignore[method-assign]
        try:
            await HealthMonitor(gw).probe(gw.pool.all()[0])
        finally:
            await gw.stop()

    asyncio.run(check())
    assert asked == [("http://d:1", 0.25)]
