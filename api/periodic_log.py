"""A line logged every interval while there is something to say: a node's and the gateway's
`stats ...` lines, as vLLM and SGLang print theirs.

Each tick costs a clock read until the interval is up; then it takes a sample, and `describe`
turns the previous sample and this one (and the seconds between them) into the line, or None for
an interval in which nothing happened: an idle component stays quiet.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Generic, TypeVar

Sample = TypeVar("Sample")
Describe = Callable[[Sample, Sample, float], "str | None"]


class PeriodicLine(Generic[Sample]):
    """Ticked often (a loop iteration, a timer); logs at INFO at most once per `interval_s`
    (0: never, not even a sample)."""

    def __init__(
        self,
        interval_s: float,
        describe: Describe[Sample],
        logger: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.describe = describe
        self.logger = logger
        self.clock = clock
        self.due_at = -math.inf if interval_s > 0 else math.inf  # the first tick: a baseline
        self.last: Sample | None = None
        self.last_at = 0.0

    def tick(self, take: Callable[[], Sample]) -> str | None:
        """Once the interval is up, a sample from `take` and the interval's line, logged and
        returned; None when not yet due, or when the interval was idle."""
        now = self.clock()
        if now < self.due_at:
            return None
        sample, last, elapsed = take(), self.last, now - self.last_at
        self.last, self.last_at, self.due_at = sample, now, now + self.interval_s
        if last is None or elapsed <= 0:
            return None
        line = self.describe(last, sample, elapsed)
        if line is not None:
            self.logger.info("%s", line)
        return line


def key_values(head: str, fields: dict[str, object]) -> str:
    """`head k=v k=v ...`: one line that greps well."""
    return " ".join([head, *(f"{k}={v}" for k, v in fields.items())])
