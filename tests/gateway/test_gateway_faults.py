"""Failures the gateway must absorb, against stand-in upstreams that fail on demand: retries on a
new pair, errors mid-stream, circuit breakers, health checks, client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Callable

import httpx
import pytest

from api.errors import server_error
from gateway.background import Background
from gateway.breaker import BreakerState
from gateway.outcome import AttemptFailed, Finished, Refused
from gateway.prefill_side import PrefillSide

from .conftest import Harness
from .servers import ServerThread, wait_until

COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
STREAM = {**COMPLETION, "stream": True}
RID = {"X-Request-Id": "rq1"}


def events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def settled(h: Harness) -> bool:
    """No request in flight anywhere in the gateway."""
    busy = [w for w in h.gw.pool.all() if w.outstanding or w.outstanding_tokens]
    return not busy and h.gw.metrics.inflight == 0


def test_prefill_failure_retries_on_another_pair(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=2, decode=1, prefill_policy="round_robin")
    h.prefill[0].behavior.mode = "error500"
    h.decode[0].behavior.after = h.prefill  # decode waits for the KV; prefill fails first
    with h.client() as c:
        r = c.post("/v1/completions", json=COMPLETION, headers=RID)
    assert r.status_code == 200 and r.json()["node"] == "d0"
    assert [b["rid"] for b in h.prefill[0].bodies()] == ["rq1"]
    assert [b["rid"] for b in h.prefill[1].bodies()] == ["rq1-retry1"]
    second = h.decode[0].bodies()[1]
    assert second["bootstrap_port"] == 8999 and second["rid"] == "rq1-retry1"
    wait_until(lambda: "rq1" in h.decode[0].aborts, what="the abort of the failed attempt")
    assert h.gw.metrics.retries == 1
    wait_until(lambda: settled(h), what="load accounting back to zero")


def test_unreachable_prefill_is_retried(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=2, decode=1, prefill_policy="round_robin")
    h.upstreams["p0"].stop()  # connection refused from now on
    h.decode[0].behavior.after = h.prefill
    with h.client() as c:
        for _ in range(2):
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(h.prefill[1].received) == 2


def test_every_attempt_failing_is_a_502(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=2, decode=1, max_retries=1)
    for p in h.prefill:
        p.behavior.mode = "error500"
    h.decode[0].behavior.after = h.prefill
    with h.client() as c:
        r = c.post("/v1/completions", json=COMPLETION, headers=RID)
    assert r.status_code == 502 and r.headers["x-request-id"] == "rq1"
    error = r.json()["error"]
    assert error["type"] == "server_error" and "prefill instance" in error["message"]
    assert "2 attempts" in error["message"]
    wait_until(lambda: {"rq1", "rq1-retry1"} <= set(h.decode[0].aborts), what="both aborts")


def test_decode_failure_retries_and_aborts_the_prefill(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=1, decode=2, decode_policy="round_robin")
    h.decode[0].behavior.mode = "error500"
    h.prefill[0].behavior.after = h.decode  # still prefilling when decode fails
    with h.client() as c:
        r = c.post("/v1/completions", json=COMPLETION, headers=RID)
    assert r.status_code == 200 and r.json()["node"] == "d1"
    wait_until(lambda: "rq1" in h.prefill[0].aborts, what="the prefill abort")


def test_a_node_refusal_is_relayed_without_retry(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=2, decode=1)
    for p in h.prefill:
        p.behavior.mode = "error400"
    h.decode[0].behavior.after = h.prefill
    with h.client() as c:
        r = c.post("/v1/completions", json=COMPLETION, headers=RID)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert sum(len(p.received) for p in h.prefill) == 1  # no retry
    wait_until(lambda: "rq1" in h.decode[0].aborts, what="the decode abort")
    assert h.gw.metrics.retries == 0


def test_a_read_cut_short_by_prefill_refusal_is_closed_not_leaked() -> None:
    """Decode's 4xx body read is handed to `PrefillSide.guard` after prefill already refused:
    the read coroutine must be closed (it used to be dropped unawaited, which Python reports
    as 'coroutine ... was never awaited')."""

    async def scenario() -> str:
        refused = asyncio.get_running_loop().create_future()
        refused.set_result(Refused(Finished(400, b'{"error": {}}')))
        prefill = PrefillSide(refused)

        async def read_body() -> bytes:
            return b"never read"

        read = read_body()
        with pytest.raises(Refused):
            await prefill.guard(read)
        return inspect.getcoroutinestate(read)

    assert asyncio.run(scenario()) == inspect.CORO_CLOSED


def test_a_prefill_failure_ends_a_decode_step_that_swallows_its_cancel() -> None:
    """A decode step that does not honour a cancel (Python 3.11's wait_for swallows one that
    meets its result) must not hold the attempt: the prefill verdict is raised at once, and an
    answer the step gets all the same is closed."""

    class Answer:
        closed = False

        async def aclose(self) -> None:
            self.closed = True

    async def scenario() -> Answer:
        loop = asyncio.get_running_loop()
        prefill_done: asyncio.Future = loop.create_future()
        release, answer, tasks = asyncio.Event(), Answer(), Background()
        prefill = PrefillSide(prefill_done, tasks)

        async def stubborn() -> Answer:
            while True:
                try:
                    await release.wait()
                    return answer
                except asyncio.CancelledError:
                    continue

        guarded = asyncio.ensure_future(prefill.guard(stubborn()))
        await asyncio.sleep(0.01)
        failed = AttemptFailed("http://prefill", server_error("it is draining", code="draining"))
        prefill_done.set_result(failed)
        async with asyncio.timeout(5):
            with pytest.raises(AttemptFailed):
                await guarded
        release.set()  # the decode node answers once the attempt's abort reaches it
        async with asyncio.timeout(5):
            while not answer.closed:
                await asyncio.sleep(0.001)
        await tasks.cancel_all()
        return answer

    assert asyncio.run(scenario()).closed


def test_stream_retried_when_prefill_fails_before_the_first_event(
    harness: Callable[..., Harness],
) -> None:
    h = harness(prefill=2, decode=1, prefill_policy="round_robin")
    h.prefill[0].behavior.mode = "error500"
    h.decode[0].behavior.after = h.prefill
    with h.client() as c, c.stream("POST", "/v1/completions", json=STREAM) as r:
        assert r.status_code == 200
        got = events(r)
    assert got[-1] == "[DONE]" and len(got) == 4
    assert all(json.loads(e)["node"] == "d0" for e in got[:-1])
    assert h.gw.metrics.retries == 1


def test_stream_error_event_first_is_retried(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=2, decode_policy="round_robin")
    h.decode[0].behavior.mode = "error_event"
    with h.client() as c, c.stream("POST", "/v1/completions", json=STREAM) as r:
        got = events(r)
    assert [json.loads(e)["node"] for e in got[:-1]] == ["d1"] * 3


def test_stream_cut_that_cannot_move_ends_with_an_error_event(
    harness: Callable[..., Harness],
) -> None:
    h = harness(prefill=1, decode=1, max_migrations=0)
    h.decode[0].behavior.mode = "cut"
    h.decode[0].behavior.hang_after = 2
    with h.client() as c, c.stream("POST", "/v1/completions", json=STREAM) as r:
        assert r.status_code == 200
        got = events(r)
    assert [json.loads(e)["choices"][0]["text"] for e in got[:2]] == ["d0-t0 ", "d0-t1 "]
    error = json.loads(got[2])["error"]
    assert error["code"] == "upstream_error" and "mid-stream" in error["message"]
    assert got[3:] == ["[DONE]"]
    assert h.gw.metrics.stream_errors == 1 and h.gw.metrics.retries == 0
    wait_until(lambda: settled(h), what="load accounting back to zero")


def test_breaker_opens_then_half_opens(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=2, decode_policy="round_robin", breaker_errors=2,
                breaker_cooldown_s=0.5)  # fmt: skip
    h.decode[0].behavior.mode = "error500"
    bad = next(w for w in h.gw.pool.all() if w.url == h.url_of(h.decode[0]))
    with h.client() as c:
        for _ in range(4):  # round robin: d0 fails twice (then retried on d1)
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200
        assert bad.breaker.state(h.gw.clock()) is BreakerState.OPEN
        sent = len(h.decode[0].received)
        for _ in range(4):
            c.post("/v1/completions", json=COMPLETION)
        assert len(h.decode[0].received) == sent  # open: no traffic
        assert 'breaker_open{role="decode",url="' + bad.url + '"} 1' in c.get("/metrics").text
        wait_until(lambda: bad.breaker.state(h.gw.clock()) is BreakerState.HALF_OPEN)
        h.decode[0].behavior.mode = "ok"
        for _ in range(3):
            c.post("/v1/completions", json=COMPLETION)
    assert len(h.decode[0].received) > sent  # the trial went through and closed it
    assert bad.breaker.state(h.gw.clock()) is BreakerState.CLOSED


def test_health_checks_take_an_instance_out_and_back(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=0, decode=2, health_interval_s=0.05, health_failures=2)
    sick = next(w for w in h.gw.pool.all() if w.url == h.url_of(h.decode[0]))
    h.decode[0].behavior.healthy = False
    wait_until(lambda: not sick.healthy, what="d0 taken out")
    with h.client() as c:
        for _ in range(5):
            assert c.post("/v1/completions", json=COMPLETION).json()["node"] == "d1"
        assert c.get("/health").json()["available"]["decode"] == 1
    h.decode[0].behavior.healthy = True
    wait_until(lambda: sick.healthy, what="d0 back")
    # a node that dies and comes back on its port
    port = h.upstreams["d0"].port
    h.upstreams["d0"].stop()
    wait_until(lambda: not sick.healthy, what="dead d0 taken out")
    h.upstreams["d0"] = ServerThread(h.decode[0].app(), port).start()
    wait_until(lambda: sick.healthy, what="restarted d0 back")


BOOTSTRAP = {"bootstrap_host", "bootstrap_port", "bootstrap_room"}


def test_no_prefill_ready_sends_requests_to_decode_to_prefill(
    harness: Callable[..., Harness],
) -> None:
    """PD mode with every prefill instance out: decode instances get the requests without
    bootstrap fields (they prefill themselves), until a prefill instance is back."""
    h = harness(prefill=1, decode=1, health_interval_s=0.05, health_failures=2)
    sick = next(w for w in h.gw.pool.all() if w.url == h.url_of(h.prefill[0]))
    h.prefill[0].behavior.healthy = False
    wait_until(lambda: not sick.healthy, what="p0 taken out")
    with h.client() as c:
        assert c.get("/health").json() == {
            "status": "ok",
            "available": {"prefill": 0, "decode": 1},
        }
        plain = c.post("/v1/completions", json=COMPLETION)
        streamed = c.post("/v1/completions", json=STREAM)
        assert plain.status_code == 200 and plain.json()["node"] == "d0"
        assert streamed.status_code == 200 and events(streamed)[-1] == "[DONE]"
        assert h.prefill[0].received == []
        assert [BOOTSTRAP & body.keys() for body in h.decode[0].bodies()] == [set(), set()]
        assert "pdserve_gateway_prefill_fallbacks_total 2" in c.get("/metrics").text
        h.prefill[0].behavior.healthy = True
        wait_until(lambda: sick.healthy, what="p0 back")
        h.decode[0].behavior.after = h.prefill
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200
    assert len(h.prefill[0].received) == 1
    assert h.decode[0].bodies()[-1].keys() >= BOOTSTRAP
    assert h.gw.metrics.prefill_fallbacks == 2 and h.gw.metrics.retries == 0


def test_prefills_that_all_failed_a_request_fall_back_before_the_health_checks_notice(
    harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """Both prefill instances dead (refused connections) but not yet taken out: the request
    tries each, then a decode instance prefilling itself, and succeeds; at debug level the
    gateway logs each attempt's pair."""
    h = harness(prefill=2, decode=1, prefill_policy="round_robin")
    h.upstreams["p0"].stop()
    h.upstreams["p1"].stop()
    h.decode[0].behavior.after = h.prefill
    with h.client() as c, caplog.at_level(logging.DEBUG, logger="pdserve.gateway"):
        r = c.post("/v1/completions", json=COMPLETION, headers=RID)
    d0, p0, p1 = (h.url_of(s) for s in (h.decode[0], *h.prefill))
    attempts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attempt ")]
    assert attempts == [
        f"attempt rid=rq1 number={n} decode={d0} prefill={p}"
        for n, p in enumerate((p0, p1, "none"))
    ]
    assert r.status_code == 200 and r.json()["node"] == "d0"
    assert [b["rid"] for b in h.decode[0].bodies()] == ["rq1", "rq1-retry1", "rq1-retry2"]
    assert [BOOTSTRAP & b.keys() for b in h.decode[0].bodies()] == [BOOTSTRAP, BOOTSTRAP, set()]
    assert h.gw.metrics.prefill_fallbacks == 1 and h.gw.metrics.retries == 2
    assert not h.gw.falling_back  # both still count as healthy: no cluster-wide fallback


def test_without_the_fallback_no_prefill_ready_is_a_503(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=1, decode=1, health_interval_s=0.05, health_failures=2,
                prefill_fallback=False)  # fmt: skip
    sick = next(w for w in h.gw.pool.all() if w.url == h.url_of(h.prefill[0]))
    h.prefill[0].behavior.healthy = False
    wait_until(lambda: not sick.healthy, what="p0 taken out")
    with h.client() as c:
        r = c.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_instance"
        assert "prefill" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 503
    assert h.decode[0].received == [] and h.gw.metrics.prefill_fallbacks == 0


def test_client_disconnect_mid_stream_aborts_both_nodes(harness: Callable[..., Harness]) -> None:
    h = harness(prefill=1, decode=1)
    h.decode[0].behavior.mode = "hang"  # one event, then silence
    with h.client() as c, c.stream("POST", "/v1/completions", json=STREAM, headers=RID) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    wait_until(lambda: "rq1" in h.decode[0].aborts and "rq1" in h.prefill[0].aborts,
               what="aborts on both nodes")  # fmt: skip
    wait_until(lambda: "rq1" in h.decode[0].cancelled, what="the decode stream closed")
    wait_until(lambda: settled(h), what="load accounting back to zero")


def test_client_disconnect_before_an_answer_aborts_both_nodes(
    harness: Callable[..., Harness],
) -> None:
    h = harness(prefill=1, decode=1)
    h.decode[0].behavior.mode = "hang"
    # the client gives up waiting: a disconnect before any answer
    with h.client(timeout=0.5) as c, contextlib.suppress(httpx.ReadTimeout):
        c.post("/v1/completions", json=COMPLETION, headers=RID)
    wait_until(lambda: "rq1" in h.decode[0].aborts and "rq1" in h.prefill[0].aborts,
               what="aborts on both nodes")  # fmt: skip
    wait_until(lambda: settled(h), what="load accounting back to zero")
    assert 'status="499"' in h.client().get("/metrics").text
