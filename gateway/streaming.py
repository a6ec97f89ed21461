"""Responses that notice a client leaving, even while nothing is due to be sent.

`EventStreamResponse` streams SSE events while it listens for `http.disconnect`; when the client
goes, the event iterator is cancelled (its cleanup aborts the request upstream). `until_disconnect`
does the same for the time before a response exists.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from api.sse import MEDIA_TYPE, STREAM_HEADERS

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its response began."""


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result; if the client leaves first, it is cancelled and `ClientGone` raised."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()


class EventStreamResponse:
    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: Mapping[str, str],
        on_close: Callable[[], None],
    ) -> None:
        self.events = events
        self.on_close = on_close
        merged = {**STREAM_HEADERS, **headers, "content-type": MEDIA_TYPE}
        self.raw_headers = [(k.lower().encode(), v.encode()) for k, v in merged.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            gone = asyncio.ensure_future(wait_disconnect(receive))
            try:
                await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                pump.cancel()  # the client left first: stop relaying (the events clean up)
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
        finally:
            self.on_close()

    async def _pump(self, send: Send) -> None:
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
