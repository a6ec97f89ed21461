"""One keep-alive HTTP/1.1 connection to a node (an asyncio protocol parsed by httptools) and
the body of its current response; the pool that owns them is transport.NodeTransport.

A connection answers one request at a time: `begin` arms it, the parser's callbacks fill the
status, headers and body chunks, `Body` hands the chunks to httpx as they arrive and, at the
message's end, gives the connection back to its pool (`Pool.release`); a connection the node
closes tells the pool at once (`Pool.closed`).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx

try:
    import httptools
except ImportError:  # NOTE: uvicorn[standard] brings it; transport.py checks before using this
    httptools = None

Origin = tuple[bytes, int]  # (host, port)

PAUSE_BYTES = 256 * 1024  # stop reading a connection whose unread body is this big (until read)
NOT_SENT = "the node closed the connection before it answered"
CUT = "the node closed the connection before the response was complete"


class Pool(Protocol):
    """What a connection tells the pool that owns it."""

    def release(self, conn: Connection) -> None: ...

    def closed(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One keep-alive connection, one response at a time (its parser's callbacks fill it)."""

    def __init__(self, pool: Pool, origin: Origin, epoch: int = 0) -> None:
        self.pool, self.origin = pool, origin
        self.epoch = epoch  # the origin's epoch when it connected (see NodeTransport._retire)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.used = False  # has answered a request before (a reused connection)
        self.idle_since = 0.0
        self._begin(None)

    def _begin(self, head: asyncio.Future[None] | None) -> None:
        self.head = head
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.status = 0  # once the head is in
        self.answered = False  # a byte of this response arrived
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # ---- asyncio protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.head is None or self.complete:  # NOTE: bytes nobody asked for: drop the connection
            self.close()
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the node sent a malformed response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        if self.head is not None and not self.complete and self.error is None:
            if self.status and body_until_eof(self.status, self.headers):
                self.on_message_complete()  # NOTE: httptools has no finish(): EOF ends it here
                self.keep_alive = False
            else:
                self._fail(httpx.RemoteProtocolError(CUT if self.answered else NOT_SENT))
        if not was_closed:
            self.pool.closed(self)

    # ---- httptools callbacks ----

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # NOTE: reads False once past here
        self.complete = True
        self._wake()

    # ---- the response, as the body stream reads it ----

    def _fail(self, error: Exception) -> None:
        self.error = error
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def take(self) -> bytes:
        """Every body byte that arrived so far."""
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def wait_body(self, timeout: float | None) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await within(self.waiter, timeout, "reading the response")

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.closed:
            self.closed = True
            self.pool.closed(self)


class Body(httpx.AsyncByteStream):
    """The body of one response; its end hands the connection back to the pool."""

    def __init__(self, conn: Connection, read_timeout: float | None) -> None:
        self.conn = conn
        self.read_timeout = read_timeout
        self.done = False

    @property
    def at_end(self) -> bool:
        """The whole body has arrived (what is left unread can be dropped)."""
        return self.conn.complete

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        while not self.done:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                self._finish()
            elif conn.error is not None:
                self._finish()
                raise conn.error
            else:
                await conn.wait_body(self.read_timeout)

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.conn.pool.release(self.conn)

    def fail(self, error: Exception) -> None:
        """End the body with `error` now, whatever arrives (its instance was taken out): a read
        waiting for bytes raises it, and the connection closes."""
        if not self.done and not self.conn.complete:
            self.conn._fail(error)
            self.conn.close()

    async def aclose(self) -> None:
        self._finish()  # NOTE: a body not read to its end closes the connection (see _release)


async def within(
    future: asyncio.Future[Any],
    timeout: float | None,
    what: str,
    error: type[httpx.TimeoutException] = httpx.ReadTimeout,
) -> None:
    """Await `future`, failing it with `error` after `timeout` seconds (no task is created)."""
    if timeout is None:
        await future
        return

    def expire() -> None:
        if not future.done():
            future.set_exception(error(f"timed out after {timeout}s {what}"))

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        await future
    finally:
        timer.cancel()


def body_until_eof(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """A body with neither a length nor chunks: it ends when the node closes the connection."""
    if status < 200 or status in (204, 304):
        return False
    names = {name.lower() for name, _ in headers}
    return b"content-length" not in names and b"transfer-encoding" not in names
