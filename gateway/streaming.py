"""Responses that notice a client leaving, even while nothing is due to be sent.

`EventStreamResponse` streams SSE events while it listens for `http.disconnect`; when the client
goes, the event iterator is cancelled (its cleanup aborts the request upstream). `until_disconnect`
does the same for the time before a response exists. Both listen through one `ClientWatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from starlette.types import Receive, Scope, Send

from api.sse import DONE, MEDIA_TYPE, STREAM_HEADERS

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its response began."""


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientWatch:
    """One request's watch for its client leaving: a task reading `receive` until
    `http.disconnect`, started when first needed (after the request body was read) and shared by
    the time before the response and the stream (one task per request, not one per phase)."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self._task: asyncio.Future[None] | None = None

    @property
    def gone(self) -> bool:
        return self._task is not None and self._task.done() and not self._task.cancelled()

    def cancel_on_leave(self, task: asyncio.Future[Any]) -> Callable[[], None]:
        """Cancel `task` when the client leaves; returns the function that stops this."""
        if self._task is None:
            self._task = asyncio.ensure_future(wait_disconnect(self.receive))

        def cancel(_: asyncio.Future[None]) -> None:
            task.cancel()

        watcher = self._task
        watcher.add_done_callback(cancel)
        return lambda: watcher.remove_done_callback(cancel)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def until_disconnect(watch: ClientWatch, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result; if the client leaves first, it is cancelled and `ClientGone` raised."""
    task = asyncio.ensure_future(awaitable)
    forget = watch.cancel_on_leave(task)
    try:
        return await task
    except asyncio.CancelledError:
        if watch.gone and task.cancelled():
            raise ClientGone() from None
        raise
    finally:
        forget()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class EventStreamResponse:
    """An SSE response of `events`; the one that ends in `[DONE]` is the last (one write)."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: Mapping[str, str],
        on_close: Callable[[], None],
        watch: ClientWatch,
    ) -> None:
        self.events = events
        self.on_close = on_close
        self.watch = watch
        merged = {**STREAM_HEADERS, **headers, "content-type": MEDIA_TYPE}
        self.raw_headers = [(k.lower().encode(), v.encode()) for k, v in merged.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if not self.watch.gone:
                await self._pump_until_gone(send)
        finally:
            self.watch.stop()
            self.on_close()

    async def _pump_until_gone(self, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        forget = self.watch.cancel_on_leave(pump)  # the client left first: stop relaying
        try:
            await pump
        except asyncio.CancelledError:
            if not (self.watch.gone and pump.cancelled()):
                raise
        finally:
            forget()
            if not pump.done():
                pump.cancel()  # NOTE: we were cancelled: the events clean up all the same
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    async def _pump(self, send: Send) -> None:
        try:
            async for event in self.events:
                last = event.endswith(DONE)  # NOTE: a stream's last event; the response ends too
                await send({"type": "http.response.body", "body": event, "more_body": not last})
                if last:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
