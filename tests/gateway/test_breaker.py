"""Circuit breaker states and how they gate a worker."""

from __future__ import annotations

from api.settings import Instance
from gateway.breaker import BreakerState, CircuitBreaker
from gateway.workers import Worker, WorkerPool


def test_opens_after_threshold_consecutive_errors() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=10.0)
    b.record_failure(0.0)
    b.record_failure(0.0)
    b.record_success()  # resets the run
    b.record_failure(1.0)
    b.record_failure(1.0)
    assert b.state(1.0) is BreakerState.CLOSED and b.allows(1.0)
    b.record_failure(1.0)
    assert b.state(1.0) is BreakerState.OPEN and not b.allows(5.0)


def test_half_open_lets_one_trial_through_after_cooldown() -> None:
    b = CircuitBreaker(threshold=1, cooldown_s=10.0)
    b.record_failure(0.0)
    assert not b.allows(9.9)
    assert b.state(10.0) is BreakerState.HALF_OPEN and b.allows(10.0)
    b.on_send(10.0)
    assert not b.allows(10.1)  # one trial at a time
    b.record_success()
    assert b.state(10.2) is BreakerState.CLOSED and b.allows(10.2)


def test_failed_trial_opens_again_for_a_full_cooldown() -> None:
    b = CircuitBreaker(threshold=5, cooldown_s=10.0)
    for _ in range(5):
        b.record_failure(0.0)
    b.on_send(10.0)  # half-open trial
    b.record_failure(11.0)  # one failure is enough in half-open
    assert b.state(20.0) is BreakerState.OPEN
    assert b.state(21.0) is BreakerState.HALF_OPEN


def test_an_aborted_trial_frees_the_half_open_slot() -> None:
    b = CircuitBreaker(threshold=1, cooldown_s=1.0)
    b.record_failure(0.0)
    b.on_send(1.0)
    assert not b.allows(1.0)
    b.on_done()  # the trial was abandoned: no verdict
    assert b.state(1.0) is BreakerState.HALF_OPEN and b.allows(1.0)


def test_threshold_zero_never_opens() -> None:
    b = CircuitBreaker(threshold=0, cooldown_s=10.0)
    for _ in range(100):
        b.record_failure(0.0)
    assert b.allows(0.0)


def test_pool_skips_open_and_unhealthy_workers_and_prefers_unexcluded() -> None:
    pool = WorkerPool(breaker_errors=1, breaker_cooldown_s=10.0)
    a = pool.add("decode", Instance("http://127.0.0.1:1/"))
    b = pool.add("decode", Instance("http://127.0.0.1:2"))
    c = pool.add("decode", Instance("http://127.0.0.1:3"))
    assert a.url == "http://127.0.0.1:1"  # normalized
    a.breaker.record_failure(0.0)
    b.healthy = False
    assert pool.available("decode", 1.0) == [c]
    assert pool.available("decode", 1.0, exclude=[c.url]) == [c]  # nothing else: excluded it is
    assert pool.available("decode", 10.0, exclude=[c.url]) == [a]  # a is half-open now
    assert not pool.has_prefill()


def test_an_instance_taken_back_after_it_was_out_gets_requests_at_once() -> None:
    pool = WorkerPool(breaker_errors=1, breaker_cooldown_s=10.0)
    w = pool.add("decode", Instance("http://127.0.0.1:1"))
    w.breaker.record_failure(0.0)  # its streams failed as it died
    assert w.take_back() is False  # it was never out: a passing check alone closes nothing
    assert pool.available("decode", 1.0) == []
    w.take_out("health checks failed")
    assert w.take_back() is True  # a passing check after it was out: restarted
    assert pool.available("decode", 1.0) == [w] and w.breaker.state(1.0) is BreakerState.CLOSED


def test_worker_load_accounting() -> None:
    w = Worker("decode", Instance("http://h:1"), CircuitBreaker(1, 1.0))
    w.begin(100, 0.0)
    w.begin(50, 0.0)
    w.end(100)
    assert (w.outstanding, w.outstanding_tokens) == (1, 50)
    assert w.describe(0.0)["breaker"] == "closed" and w.host == "h"
