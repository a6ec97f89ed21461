"""The instances the gateway routes to, with what it knows of each: health, breaker, load.

A `Worker` is mutable runtime state owned by one `WorkerPool` (one per gateway app). Load is what
this gateway itself has in flight on the instance: requests and (estimated) tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from api.errors import DRAINING
from api.settings import Instance, Role

from .breaker import BreakerState, CircuitBreaker

ROLES: tuple[Role, ...] = ("prefill", "decode")


def normalize_url(url: str) -> str:
    """`http://host:port` without a trailing slash; ValueError naming the expected form."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"instance url {url!r} is not http(s)://host:port")
    return url


class Watcher(Protocol):
    def taken_out(self, worker: Worker, reason: str) -> None: ...


@dataclass(eq=False)
class Worker:
    role: Role
    instance: Instance
    breaker: CircuitBreaker
    healthy: bool = True
    failed_checks: int = 0  # consecutive failed health checks
    outstanding: int = 0  # requests in flight through this gateway
    outstanding_tokens: int = 0
    out_reason: str | None = None  # why it was taken out of routing (None while healthy)
    host: str = field(init=False)
    # told when the instance is taken out (`taken_out(worker, reason)`): the exchanges waiting
    # on it, so that what streams from it moves at once
    watchers: set[Watcher] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.host = urlsplit(self.instance.url).hostname or ""

    def take_out(self, reason: str) -> bool:
        """Stop routing to the instance (health checks failed, it is draining, it hangs) and
        wake what streams from it; False when it was out already."""
        was_in = self.healthy
        self.healthy, self.out_reason = False, reason
        for watcher in list(self.watchers):
            watcher.taken_out(self, reason)
        return was_in

    def take_back(self) -> bool:
        """Route to the instance again (a health check passed); False when it was in.

        Its breaker closes too: the errors that opened it came while the instance was going
        out (killed, hung, draining), and a passing check after that says it is back (often a
        new process: the launcher restarted it). Else a restarted node would get nothing until
        the cooldown and one trial."""
        if self.healthy:
            return False
        self.healthy, self.out_reason, self.failed_checks = True, None, 0
        self.breaker.record_success()
        return True

    def attempt_failed(self, now: float, draining: bool) -> None:
        """An attempt failed here: one more breaker error; but an instance that said it is
        draining is fine, only leaving: it is taken out instead (a passing check takes it back)."""
        if draining:
            self.take_out(DRAINING)
        else:
            self.breaker.record_failure(now)

    @property
    def url(self) -> str:
        return self.instance.url

    @property
    def bootstrap_port(self) -> int | None:
        return self.instance.bootstrap_port

    def available(self, now: float) -> bool:
        return self.healthy and self.breaker.allows(now)

    def begin(self, tokens: int, now: float) -> None:
        self.outstanding += 1
        self.outstanding_tokens += tokens
        self.breaker.on_send(now)

    def end(self, tokens: int) -> None:
        self.outstanding -= 1
        self.outstanding_tokens -= tokens
        self.breaker.on_done()

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "role": self.role,
            "url": self.url,
            "bootstrap_port": self.bootstrap_port,
            "healthy": self.healthy,
            "breaker": self.breaker.state(now).value,
            "outstanding": self.outstanding,
            "outstanding_tokens": self.outstanding_tokens,
        }

    def is_open(self, now: float) -> bool:
        return self.breaker.state(now) is BreakerState.OPEN


@dataclass(frozen=True)
class Pair:
    """Where one attempt goes: a prefill instance (None: colocated) and a decode instance."""

    prefill: Worker | None
    decode: Worker


class WorkerPool:
    """Prefill and decode workers by url, in the order they were added."""

    def __init__(self, breaker_errors: int, breaker_cooldown_s: float) -> None:
        self._breaker = (breaker_errors, breaker_cooldown_s)
        self._workers: dict[str, Worker] = {}
        self._prefills = 0  # NOTE: counted, since every request asks (has_prefill)

    def add(self, role: Role, instance: Instance) -> Worker:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        url = normalize_url(instance.url)
        if url in self._workers:
            raise KeyError(
                f"{url} is already a {self._workers[url].role} instance (remove it first)"
            )
        worker = Worker(
            role, Instance(url, instance.bootstrap_port), CircuitBreaker(*self._breaker)
        )
        self._workers[url] = worker
        if role == "prefill":
            self._prefills += 1
        return worker

    def remove(self, url: str) -> Worker:
        try:
            worker = self._workers.pop(normalize_url(url))
        except KeyError:
            raise KeyError(
                f"{url} is not an instance of this gateway (GET /workers lists them)"
            ) from None
        if worker.role == "prefill":
            self._prefills -= 1
        return worker

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def of_role(self, role: Role) -> list[Worker]:
        return [w for w in self._workers.values() if w.role == role]

    def available(self, role: Role, now: float, exclude: Iterable[str] = ()) -> list[Worker]:
        """Workers of `role` that may take a request; those in `exclude` only when none else can."""
        ready = [w for w in self._workers.values() if w.role == role and w.available(now)]
        if not exclude:
            return ready
        skip = set(exclude)
        preferred = [w for w in ready if w.url not in skip]
        return preferred or ready

    def has_prefill(self) -> bool:
        """PD mode (else colocated: decode instances prefill locally)."""
        return self._prefills > 0
