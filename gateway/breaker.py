"""A circuit breaker per instance: stop sending to an instance that keeps failing requests.

    CLOSED --(threshold consecutive errors)--> OPEN --(cooldown)--> HALF_OPEN
    HALF_OPEN --(trial request succeeds)--> CLOSED;  HALF_OPEN --(trial fails)--> OPEN

In HALF_OPEN one trial request at a time is let through. Times are passed in (seconds of a
monotonic clock), so tests drive the clock.
"""

from __future__ import annotations

import enum


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, threshold: int, cooldown_s: float) -> None:
        self.threshold = threshold  # 0 or less: never opens
        self.cooldown_s = cooldown_s
        self.errors = 0  # consecutive
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._trial_in_flight = False

    def state(self, now: float) -> BreakerState:
        if self._state is BreakerState.OPEN and now - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        return self._state

    def allows(self, now: float) -> bool:
        """May a request go to this instance now?"""
        state = self.state(now)
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._trial_in_flight
        )

    def on_send(self, now: float) -> None:
        """A request was sent (in HALF_OPEN it is the trial)."""
        if self.state(now) is BreakerState.HALF_OPEN:
            self._trial_in_flight = True

    def on_done(self) -> None:
        """A request ended; a trial that ended without a verdict (aborted) frees the slot."""
        self._trial_in_flight = False

    def record_success(self) -> None:
        self.errors = 0
        self._state = BreakerState.CLOSED
        self._trial_in_flight = False

    def record_failure(self, now: float) -> None:
        self.errors += 1
        tripped = self.threshold > 0 and self.errors >= self.threshold
        if tripped or self.state(now) is BreakerState.HALF_OPEN:
            self._state = BreakerState.OPEN
            self._opened_at = now
            self._trial_in_flight = False
