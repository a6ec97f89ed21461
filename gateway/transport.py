"""`NodeTransport`: httpx's transport for plain-HTTP/1.1 node traffic, lean enough for a hot path.

The gateway keeps httpx's client API (requests, streamed responses, timeouts, exceptions); only the
layer under it changes. httpx's default transport (httpcore) costs about as much as the rest of the
gateway per request: anyio and h11 layers, and a pool that walks every connection and polls every
idle socket on each request and each release, so a busy gateway holding hundreds of connections
pays for all of them every time. Here each connection is an asyncio protocol parsed by httptools
(uvicorn[standard] brings it), idle connections wait in a per-origin stack, and a connection the
node closes leaves the pool when the event loop sees it go (`connection_lost`), with no polling.
Each new connection resolves the node's host name again (resolve.py); a failed connect retires
every connection to that instance, idle or busy, so its next attempt resolves the name afresh
instead of reusing a connection to the address a restarted pod no longer has.

Anything else (https, streamed request bodies, HEAD) goes to httpx's own transport.

    request:  acquire (idle stack, else connect) -> write head + body -> await the head
    response: body chunks as they arrive (all buffered chunks joined per step) -> at the message's
              end the connection goes back to its stack (kept alive) or is closed
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .resolve import Resolve, open_connection, system_resolve

try:
    import httptools
except ImportError:  # NOTE: uvicorn[standard] brings it; without it, httpx's own transport
    httptools = None

Origin = tuple[bytes, int]  # (host, port)
PAUSE_BYTES = 256 * 1024  # stop reading a connection whose unread body is this big (until read)
NOT_SENT = "the node closed the connection before it answered"
CUT = "the node closed the connection before the response was complete"


def node_transport(
    limits: httpx.Limits, resolve: Resolve = system_resolve
) -> httpx.AsyncBaseTransport:
    """The transport for node traffic: `NodeTransport` when httptools is there (without it,
    httpx's own, which resolves names itself and cannot take `resolve`)."""
    if httptools is None:
        return httpx.AsyncHTTPTransport(limits=limits)
    return NodeTransport(
        limits.max_connections or 1024,
        limits.max_keepalive_connections or 0,
        limits.keepalive_expiry if limits.keepalive_expiry is not None else 5.0,
        resolve,
    )


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one response at a time (its parser's callbacks fill it)."""

    def __init__(self, pool: NodeTransport, origin: Origin, epoch: int = 0) -> None:
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
            if self.status and _body_until_eof(self.status, self.headers):
                self.on_message_complete()  # NOTE: httptools has no finish(): EOF ends it here
                self.keep_alive = False
            else:
                self._fail(httpx.RemoteProtocolError(CUT if self.answered else NOT_SENT))
        if not was_closed:
            self.pool._closed(self)

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
        await _within(self.waiter, timeout, "reading the response")

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.closed:
            self.closed = True
            self.pool._closed(self)


class _Body(httpx.AsyncByteStream):
    """The body of one response; its end hands the connection back to the pool."""

    def __init__(self, conn: _Connection, read_timeout: float | None) -> None:
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
            self.conn.pool._release(self.conn)

    def fail(self, error: Exception) -> None:
        """End the body with `error` now, whatever arrives (its instance was taken out): a read
        waiting for bytes raises it, and the connection closes."""
        if not self.done and not self.conn.complete:
            self.conn._fail(error)
            self.conn.close()

    async def aclose(self) -> None:
        self._finish()  # NOTE: a body not read to its end closes the connection (see _release)


class NodeTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        max_connections: int,
        max_keepalive: int,
        keepalive_s: float = 5.0,
        resolve: Resolve = system_resolve,
    ) -> None:
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        # NOTE: an idle connection is not reused after this long: the node may be closing it
        # (uvicorn's default keep-alive timeout is 5 s, httpx's expiry too)
        self.keepalive_s = keepalive_s
        self._idle: dict[Origin, list[_Connection]] = collections.defaultdict(list)
        self._idle_count = 0
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._resolve = resolve
        # NOTE: bumped when a connect to the origin fails: older connections are not reused
        self._epochs: dict[Origin, int] = collections.defaultdict(int)
        self._fallback = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http" or request.method == "HEAD" or not _has_bytes_body(request):
            return await self._fallback.handle_async_request(request)
        timeouts = request.extensions.get("timeout", {})
        origin = (url.raw_host, url.port or 80)
        raw = _request_bytes(request)
        conn = await self._acquire(origin, timeouts)
        try:
            await self._send(conn, raw, timeouts.get("read"))
        except httpx.RemoteProtocolError:
            if not conn.used or conn.answered:
                raise
            # NOTE: a kept-alive connection the node closed just as we reused it, before the
            # loop saw it go: nothing reached the node's app, so one fresh connection may retry.
            conn = await self._acquire(origin, timeouts, reuse=False)
            await self._send(conn, raw, timeouts.get("read"))
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason},
        )

    async def _send(self, conn: _Connection, raw: bytes, read_timeout: float | None) -> None:
        head = asyncio.get_running_loop().create_future()
        conn._begin(head)
        try:
            assert conn.transport is not None
            conn.transport.write(raw)
            await _within(head, read_timeout, "waiting for the response")
        except BaseException:
            conn.close()  # NOTE: cancelled or failed mid-request: the connection is unusable
            raise

    async def _acquire(
        self, origin: Origin, timeouts: dict[str, Any], reuse: bool = True
    ) -> _Connection:
        """An idle connection to `origin`, else a new one once the pool has room for it."""
        while True:
            conn = self._pop_idle(origin) if reuse else None
            if conn is not None:
                return conn
            if self._open < self.max_connections:
                break
            if self._idle_count:
                self._close_some_idle()  # room for this origin, at another's expense
            else:
                await self._wait_slot(timeouts.get("pool"))
        self._open += 1
        try:
            return await self._connect(origin, timeouts.get("connect"))
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    def _pop_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = asyncio.get_running_loop().time() if idle else 0.0
        while idle:
            conn = idle.pop()  # NOTE: the most recently used: likeliest still open
            self._idle_count -= 1
            fresh = now - conn.idle_since < self.keepalive_s
            if not conn.closed and fresh and conn.epoch == self._epochs[origin]:
                return conn
            conn.close()
        return None

    def _close_some_idle(self) -> None:
        for idle in self._idle.values():
            if idle:
                idle[0].close()
                return

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        host, epoch = origin[0].decode("ascii"), self._epochs[origin]
        opening = open_connection(
            lambda: _Connection(self, origin, epoch), host, origin[1], self._resolve
        )
        try:
            _, conn = await asyncio.wait_for(opening, timeout)
        except asyncio.TimeoutError:
            self._retire(origin)
            raise httpx.ConnectTimeout(f"connecting to {host}:{origin[1]} timed out") from None
        except OSError as exc:
            self._retire(origin)
            raise httpx.ConnectError(str(exc)) from None
        return conn  # type: ignore[return-value]

    def _retire(self, origin: Origin) -> None:
        """A connect to `origin` failed: its name may now mean another address (a pod restarted
        elsewhere), so no connection opened before is reused; the next attempt connects anew."""
        self._epochs[origin] += 1
        for conn in list(self._idle.get(origin, ())):
            conn.close()

    async def _wait_slot(self, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await _within(waiter, timeout, "waiting for a free connection", httpx.PoolTimeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, conn: _Connection) -> None:
        """A response is over: keep its connection for the next request, or close it."""
        stale = conn.epoch != self._epochs[conn.origin]
        if stale or not conn.reusable() or self._idle_count >= self.max_keepalive:
            conn.close()
            return
        conn.used = True
        conn.head = None
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle[conn.origin].append(conn)
        self._idle_count += 1
        self._wake_one()  # NOTE: a waiter for another origin may now close an idle one

    def _closed(self, conn: _Connection) -> None:
        self._open -= 1
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
            self._idle_count -= 1
        self._wake_one()

    async def aclose(self) -> None:
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        await self._fallback.aclose()


async def _within(
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


def _body_until_eof(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """A body with neither a length nor chunks: it ends when the node closes the connection."""
    if status < 200 or status in (204, 304):
        return False
    names = {name.lower() for name, _ in headers}
    return b"content-length" not in names and b"transfer-encoding" not in names


def _has_bytes_body(request: httpx.Request) -> bool:
    return isinstance(request.stream, httpx.ByteStream)


def _request_bytes(request: httpx.Request) -> bytes:
    target = request.url.raw_path
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), target)]
    lines += [b"%s: %s\r\n" % pair for pair in request.headers.raw]
    lines.append(b"\r\n")
    lines.append(request.read())
    return b"".join(lines)
