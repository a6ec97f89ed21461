"""`EventStreamResponse`: an SSE response that notices its client leaving, even while nothing is
due to be sent.

It streams events while it listens for `http.disconnect`; when the client goes, the event iterator
is cancelled (its cleanup aborts the request upstream). It listens through the request's
`api.http.ClientWatch`, the one `until_disconnect` used before the response existed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.types import Receive, Scope, Send

from api.http import ClientWatch
from api.sse import DONE, MEDIA_TYPE, STREAM_HEADERS


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
