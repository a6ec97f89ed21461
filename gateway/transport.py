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
from typing import Any

import httpx

from .connection import Body, Connection, Origin, within
from .resolve import Resolve, open_connection, system_resolve

try:
    import httptools
except ImportError:  # NOTE: uvicorn[standard] brings it; without it, httpx's own transport
    httptools = None


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
        self._idle: dict[Origin, list[Connection]] = collections.defaultdict(list)
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
            stream=Body(conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason},
        )

    async def _send(self, conn: Connection, raw: bytes, read_timeout: float | None) -> None:
        head = asyncio.get_running_loop().create_future()
        conn._begin(head)
        try:
            assert conn.transport is not None
            conn.transport.write(raw)
            await within(head, read_timeout, "waiting for the response")
        except BaseException:
            conn.close()  # NOTE: cancelled or failed mid-request: the connection is unusable
            raise

    async def _acquire(
        self, origin: Origin, timeouts: dict[str, Any], reuse: bool = True
    ) -> Connection:
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

    def _pop_idle(self, origin: Origin) -> Connection | None:
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

    async def _connect(self, origin: Origin, timeout: float | None) -> Connection:
        host, epoch = origin[0].decode("ascii"), self._epochs[origin]
        opening = open_connection(
            lambda: Connection(self, origin, epoch), host, origin[1], self._resolve
        )
        try:
            # NOTE: asyncio.timeout, not wait_for: Python 3.11's wait_for returns a connection
            # that opens just as its caller is cancelled, swallowing the cancel (a CI run's
            # decode attempt then outlived its refused prefill side by 30s)
            async with asyncio.timeout(timeout):
                _, conn = await opening
        except TimeoutError:
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
            await within(waiter, timeout, "waiting for a free connection", httpx.PoolTimeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def release(self, conn: Connection) -> None:
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

    def closed(self, conn: Connection) -> None:
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


def _has_bytes_body(request: httpx.Request) -> bool:
    return isinstance(request.stream, httpx.ByteStream)


def _request_bytes(request: httpx.Request) -> bytes:
    target = request.url.raw_path
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), target)]
    lines += [b"%s: %s\r\n" % pair for pair in request.headers.raw]
    lines.append(b"\r\n")
    lines.append(request.read())
    return b"".join(lines)
