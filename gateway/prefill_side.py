"""`PrefillSide`: the prefill node's half of one attempt, awaited alongside the decode side.

The prefill POST runs as a background task while the decode answer is awaited; `guard` wraps each
step of the decode side so that a prefill refusal or failure ends the wait at once (the decode
node would otherwise sit on a room whose KV never comes). Colocated attempts have no prefill side:
`PrefillSide.none()` guards nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from . import outcome
from .background import Background
from .logs import log_event
from .outcome import AttemptFailed, Refused
from .upstream import Upstream
from .workers import Worker

T = TypeVar("T")
Verdict = Refused | AttemptFailed | None  # None: prefill did its part


class PrefillSide:
    def __init__(
        self, task: asyncio.Future[Verdict] | None, tasks: Background | None = None
    ) -> None:
        self.task = task
        self.tasks = tasks  # where an abandoned step's answer is closed
        self.ok = task is None  # nothing left to wait for

    @classmethod
    def none(cls) -> PrefillSide:
        return cls(None)

    @classmethod
    def start(
        cls,
        worker: Worker,
        request: httpx.Request,
        tokens: int,
        upstream: Upstream,
        tasks: Background,
        clock: Callable[[], float],
        rid: str,
    ) -> PrefillSide:
        """Send `request` to `worker` in the background, its load counted until the task ends."""
        worker.begin(tokens, clock())
        task = tasks.spawn(_run(worker, request, upstream, clock, rid))
        # NOTE: a callback, not a finally: a task cancelled before it ran never enters its body
        task.add_done_callback(lambda _: worker.end(tokens))
        return cls(task, tasks)

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, unless the prefill side fails first (then it is cancelled and the
        prefill verdict raised)."""
        prefill = self.task
        if prefill is None or self.ok:
            return await awaitable
        if prefill.done():
            try:
                self.check()
            except BaseException:
                if inspect.iscoroutine(awaitable):
                    awaitable.close()  # never awaited: close it rather than leak a warning
                raise
            return await awaitable
        return await self._race(prefill, awaitable)

    async def _race(self, prefill: asyncio.Future[Verdict], awaitable: Awaitable[T]) -> T:
        """`awaitable` raced against the prefill side: a prefill failure that comes first raises
        at once, whether or not the awaitable honours its cancel.

        NOTE: not "cancel it, then await it": code that swallows a cancel (Python 3.11's
        wait_for does, when its future completes at that moment) would hold the attempt until
        the decode node answered. The abandoned task ends in the background: the attempt's
        abort makes the decode node answer, and its outcome is retrieved there."""
        # NOTE: in the attempt's background tasks where it has them, so that a step abandoned
        # below is still cancelled when the gateway stops
        if self.tasks is not None and inspect.iscoroutine(awaitable):
            task: asyncio.Future[T] = self.tasks.spawn(awaitable)
        else:
            task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait((task, prefill), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._abandon(task)
            raise
        if task.done():
            return task.result()
        if _succeeded(prefill):
            self.ok = True
            return await task
        self._abandon(task)
        self.check()
        raise AssertionError("unreachable: the prefill side failed")

    def _abandon(self, task: asyncio.Future[T]) -> None:
        """Cancel `task` and let it end in the background; an answer it gets all the same (its
        cancel swallowed) is closed, so its connection is not held."""

        def done(task: asyncio.Future[T]) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            close = getattr(task.result(), "aclose", None)
            if close is not None and self.tasks is not None:
                self.tasks.spawn(close())

        task.cancel()
        task.add_done_callback(done)

    def check(self) -> None:
        """Raise the finished prefill side's verdict (`Refused`, `AttemptFailed`), if any."""
        assert self.task is not None
        verdict = self.task.result()
        if verdict is not None:
            raise verdict
        self.ok = True


def _succeeded(prefill: asyncio.Future[Verdict]) -> bool:
    return not prefill.cancelled() and prefill.exception() is None and prefill.result() is None


async def _run(
    worker: Worker, request: httpx.Request, upstream: Upstream, clock: Callable[[], float], rid: str
) -> Verdict:
    """The prefill node's verdict on `request`, recorded on its breaker (or, draining, on its
    health)."""
    try:
        response = await upstream.call(request)
        media_type = response.headers.get("content-type", "")
        verdict = outcome.prefill_answer(
            worker.url, response.status_code, response.content, media_type
        )
    except httpx.HTTPError as exc:
        verdict = outcome.unreachable("prefill", worker.url, exc)
    if isinstance(verdict, AttemptFailed):
        worker.attempt_failed(clock(), verdict.draining)
        log_event(logging.WARNING, "prefill_failed", rid, error=verdict.error.message)
    else:
        worker.breaker.record_success()  # NOTE: a refusal too: the node itself is fine
    return verdict
