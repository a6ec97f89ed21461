"""`NodeTransport` against raw HTTP/1.1 servers on loopback (asyncio.start_server, no mocks).

Each test runs its own event loop (`asyncio.run`) with a server whose `reply` decides, request by
request, what raw bytes go back; the server records which connection each request came on.
"""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from gateway.transport import NodeTransport
from tests.ports import free_port

pytestmark = pytest.mark.timeout(60)


@dataclass
class Request:
    line: bytes  # b"GET /path HTTP/1.1"
    headers: dict[bytes, bytes]
    body: bytes
    connection: int  # which accepted connection (0, 1, ...) carried it

    @property
    def path(self) -> str:
        return self.line.split(b" ")[1].decode()


# The response's raw bytes, None to close the connection without answering, or a callable that
# writes the response itself (for bodies sent in pieces) and returns whether to keep the
# connection open.
Reply = Callable[[Request], Awaitable[Any]]


@dataclass
class RawServer:
    reply: Reply
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    closed_by_client: list[int] = field(default_factory=list)  # connections that saw EOF
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index, self.connections = self.connections, self.connections + 1
        try:
            while True:
                request = await read_request(reader, index)
                if request is None:
                    self.closed_by_client.append(index)
                    return
                self.requests.append(request)
                out = await self.reply(request)
                if out is None:
                    return
                if callable(out):
                    if not await out(writer):
                        return
                    continue
                writer.write(out)
                await writer.drain()
                if b"connection: close" in out.split(b"\r\n\r\n")[0].lower():
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader, connection: int) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line, *lines = head[:-4].split(b"\r\n")
    headers = {}
    for text in lines:
        name, _, value = text.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return Request(line, headers, body, connection)


@asynccontextmanager
async def raw_server(reply: Reply) -> AsyncIterator[RawServer]:
    server = RawServer(reply)
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


@asynccontextmanager
async def client_for(
    server: RawServer, transport: NodeTransport | None = None, **kw: Any
) -> AsyncIterator[httpx.AsyncClient]:
    transport = transport or NodeTransport(max_connections=16, max_keepalive=16)
    kw.setdefault("timeout", 5.0)
    async with httpx.AsyncClient(transport=transport, base_url=server.url, **kw) as client:
        yield client


def response(body: bytes = b"ok", status: str = "200 OK", headers: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    return head.encode() + body


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def echo_path(request: Request) -> bytes:
    return response(request.path.encode())


async def wait_for(condition: Callable[[], Any], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# --- keep-alive --------------------------------------------------------------------------------


def test_sequential_requests_share_one_connection() -> None:
    async def main() -> None:
        async with raw_server(echo_path) as server, client_for(server) as client:
            for i in range(5):
                r = await client.get(f"/r{i}")
                assert (r.status_code, r.text) == (200, f"/r{i}")
                assert r.http_version == "HTTP/1.1"
            posted = await client.post("/post", content=b"x" * 1000)
            assert posted.text == "/post"
            assert server.connections == 1
            assert [q.connection for q in server.requests] == [0] * 6
            assert server.requests[-1].body == b"x" * 1000

    asyncio.run(main())


def test_connection_close_header_means_a_new_connection() -> None:
    async def reply(request: Request) -> bytes:
        return response(b"bye", headers="Connection: close\r\n")

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server) as client:
            for _ in range(3):
                assert (await client.get("/")).text == "bye"
            assert [q.connection for q in server.requests] == [0, 1, 2]

    asyncio.run(main())


def test_server_closing_an_idle_connection_is_noticed() -> None:
    async def reply(request: Request) -> Any:
        async def answer_then_close(writer: asyncio.StreamWriter) -> bool:
            writer.write(response(b"once"))  # keep-alive by default, closed anyway
            await writer.drain()
            return False

        return answer_then_close

    async def main() -> None:
        transport = NodeTransport(max_connections=1, max_keepalive=1)
        async with raw_server(reply) as server, client_for(server, transport) as client:
            for _ in range(3):
                assert (await client.get("/")).text == "once"
                await asyncio.sleep(0.05)  # the loop sees the close (connection_lost)
            assert [q.connection for q in server.requests] == [0, 1, 2]

    asyncio.run(main())


def test_reused_connection_closed_before_answering_is_retried_once() -> None:
    async def reply(request: Request) -> bytes | None:
        # the first connection answers once, then closes on the next request without a byte
        if request.connection == 0 and len(server.requests) > 1:
            return None
        return response(request.path.encode())

    async def main() -> None:
        nonlocal server
        async with raw_server(reply) as server, client_for(server) as client:
            assert (await client.get("/a")).text == "/a"
            assert (await client.get("/b")).text == "/b"
            assert [(q.path, q.connection) for q in server.requests] == [
                ("/a", 0),
                ("/b", 0),
                ("/b", 1),
            ]

    server: RawServer
    asyncio.run(main())


def test_fresh_connection_closed_before_answering_is_not_retried() -> None:
    async def reply(request: Request) -> None:
        return None

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="before it answered"):
                await client.get("/")
            assert len(server.requests) == 1

    asyncio.run(main())


def test_reused_connection_cut_mid_response_is_not_retried() -> None:
    async def reply(request: Request) -> Any:
        if len(server.requests) == 1:
            return response(b"first")

        async def head_only(writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
            await writer.drain()
            return False

        return head_only

    async def main() -> None:
        nonlocal server
        async with raw_server(reply) as server, client_for(server) as client:
            assert (await client.get("/")).text == "first"
            with pytest.raises(httpx.RemoteProtocolError, match="before the response was complete"):
                await client.get("/")
            assert len(server.requests) == 2  # the node's app saw it: no second try

    server: RawServer
    asyncio.run(main())


def test_idle_connection_past_keepalive_expiry_is_not_reused() -> None:
    async def main() -> None:
        transport = NodeTransport(max_connections=4, max_keepalive=4, keepalive_s=0.05)
        async with raw_server(echo_path) as server, client_for(server, transport) as client:
            await client.get("/a")
            await asyncio.sleep(0.1)
            await client.get("/b")
            assert [q.connection for q in server.requests] == [0, 1]
            await wait_for(lambda: server.closed_by_client == [0])

    asyncio.run(main())


# --- failures as httpx raises them --------------------------------------------------------------


def test_read_timeout_waiting_for_the_head() -> None:
    async def reply(request: Request) -> bytes:
        await asyncio.sleep(1.0)
        return response()

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server, timeout=0.2) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/")

    asyncio.run(main())


def test_read_timeout_in_the_body() -> None:
    async def reply(request: Request) -> Any:
        async def stall(writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
            await writer.drain()
            await asyncio.sleep(1.0)
            return False

        return stall

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server, timeout=0.2) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/")

    asyncio.run(main())


def test_connect_refused_raises_connect_error() -> None:
    async def main() -> None:
        transport = NodeTransport(max_connections=1, max_keepalive=1)
        url = f"http://127.0.0.1:{free_port()}"
        async with httpx.AsyncClient(transport=transport, base_url=url) as client:
            for _ in range(2):  # a failed connect gives its slot back
                with pytest.raises(httpx.ConnectError):
                    await client.get("/")

    asyncio.run(main())


def test_malformed_response_raises_protocol_error() -> None:
    async def reply(request: Request) -> bytes:
        return b"NOT HTTP AT ALL\r\n\r\n"

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
                await client.get("/")

    asyncio.run(main())


# --- bodies ------------------------------------------------------------------------------------


def test_chunked_body_in_pieces_then_reuse() -> None:
    pieces = [b"alpha ", b"beta ", b"gamma"]

    async def reply(request: Request) -> Any:
        async def in_pieces(writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in pieces:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.02)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True

        return in_pieces

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server) as client:
            async with client.stream("GET", "/") as r:
                got = [chunk async for chunk in r.aiter_raw()]
            assert b"".join(got) == b"alpha beta gamma"
            assert len(got) >= 2  # streamed as it came, not buffered whole
            assert (await client.get("/")).content == b"alpha beta gamma"
            assert server.connections == 1

    asyncio.run(main())


def test_content_length_chunked_and_until_eof_bodies() -> None:
    async def reply(request: Request) -> bytes:
        if request.path == "/length":
            return response(b"by length")
        if request.path == "/chunked":
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            return head + chunked(b"by ", b"chunks")
        if request.path == "/empty":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil eof"

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server) as client:
            assert (await client.get("/length")).content == b"by length"
            assert (await client.get("/chunked")).content == b"by chunks"
            empty = await client.get("/empty")
            assert (empty.status_code, empty.content) == (204, b"")
            assert (await client.get("/eof")).content == b"until eof"
            assert [q.connection for q in server.requests] == [0, 0, 0, 0]

    asyncio.run(main())


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_body_cut_short_raises(framing: str) -> None:
    if framing == "length":
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"
    else:
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"

    async def reply(request: Request) -> Any:
        async def write_and_close(writer: asyncio.StreamWriter) -> bool:
            writer.write(raw)
            await writer.drain()
            return False

        return write_and_close

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="before the response was complete"):
                await client.get("/")
            assert len(server.requests) == 1

    asyncio.run(main())


def test_gzip_content_encoding_is_decoded() -> None:
    text = b'{"text": "' + b"compressible " * 500 + b'"}'

    async def reply(request: Request) -> bytes:
        return response(gzip.compress(text), headers="Content-Encoding: gzip\r\n")

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server) as client:
            r = await client.get("/")
            assert r.content == text
            assert r.headers["content-encoding"] == "gzip"

    asyncio.run(main())


def test_large_bodies_both_ways_read_slowly() -> None:
    big = os.urandom(3 * 1024 * 1024)  # past the transport's pause threshold

    async def reply(request: Request) -> bytes:
        if request.path == "/up":
            return response(str(len(request.body)).encode())
        return response(big)

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server) as client:
            assert (await client.post("/up", content=big)).text == str(len(big))
            async with client.stream("GET", "/down") as r:
                got = bytearray()
                async for chunk in r.aiter_raw():
                    got += chunk
                    await asyncio.sleep(0.001)  # a slow reader: the transport pauses the socket
            assert bytes(got) == big
            assert (await client.get("/down")).content == big
            assert server.connections == 1

    asyncio.run(main())


def test_streamed_request_body_and_head_use_the_fallback() -> None:
    async def reply(request: Request) -> bytes:
        if request.line.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        return response(request.body)

    async def parts() -> AsyncIterator[bytes]:
        yield b"streamed "
        yield b"body"

    async def main() -> None:
        async with raw_server(reply) as server, client_for(server) as client:
            r = await client.post("/", content=parts(), headers={"Content-Length": "13"})
            assert r.content == b"streamed body"
            head = await client.head("/")
            assert (head.status_code, head.content) == (200, b"")

    asyncio.run(main())


# --- cancellation and release ------------------------------------------------------------------


def stalled_body_server_reply(release: asyncio.Event) -> Reply:
    """/stall: head and part of a body, then the rest once `release` is set; others: path."""

    async def reply(request: Request) -> Any:
        if request.path != "/stall":
            return response(request.path.encode())

        async def stall(writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nhalf")
            await writer.drain()
            await release.wait()
            writer.write(b"rest")
            await writer.drain()
            return True

        return stall

    return reply


def test_cancelled_streaming_read_closes_the_half_read_connection() -> None:
    async def main() -> None:
        release = asyncio.Event()
        # one connection in all: a slot leaked by the cancellation would hang the next request
        transport = NodeTransport(max_connections=1, max_keepalive=1)
        reply = stalled_body_server_reply(release)
        async with raw_server(reply) as server, client_for(server, transport) as client:
            first_chunk = asyncio.Event()

            async def read() -> None:
                async with client.stream("GET", "/stall") as r:
                    async for _ in r.aiter_raw():
                        first_chunk.set()

            task = asyncio.create_task(read())
            await asyncio.wait_for(first_chunk.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()  # the server reads again, and finds the connection closed
            await wait_for(lambda: server.closed_by_client == [0])
            r = await client.get("/next", timeout=httpx.Timeout(5.0, pool=1.0))
            assert r.text == "/next"
            assert [q.connection for q in server.requests] == [0, 1]

    asyncio.run(main())


def test_cancel_while_waiting_for_the_head_closes_the_connection() -> None:
    async def reply(request: Request) -> bytes:
        if request.path == "/slow":
            await asyncio.sleep(1.0)
        return response(request.path.encode())

    async def main() -> None:
        transport = NodeTransport(max_connections=1, max_keepalive=1)
        async with raw_server(reply) as server, client_for(server, transport) as client:
            task = asyncio.create_task(client.get("/slow"))
            await wait_for(lambda: server.requests)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            r = await client.get("/next", timeout=httpx.Timeout(5.0, pool=1.0))
            assert r.text == "/next"
            assert [q.connection for q in server.requests] == [0, 1]

    asyncio.run(main())


def test_a_cancel_that_meets_the_connection_opening_is_not_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.11's wait_for hands back a result that arrives with its caller's cancel,
    swallowing the cancel: a cancelled request would go on (a gateway attempt whose prefill
    side refused kept waiting on decode for 30s)."""

    async def main() -> None:
        opened: asyncio.Future = asyncio.get_running_loop().create_future()
        entered = asyncio.Event()

        async def open_connection(factory: Callable[[], Any], *_: Any) -> Any:
            entered.set()
            return await opened

        monkeypatch.setattr("gateway.transport.open_connection", open_connection)
        transport = NodeTransport(max_connections=1, max_keepalive=1)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9") as c:
            task = asyncio.create_task(c.post("/generate", content=b"{}"))
            await asyncio.wait_for(entered.wait(), 5)
            opened.set_result((None, object()))
            task.cancel()  # in the same step as the connection opening
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_closing_a_fully_arrived_body_unread_keeps_the_connection() -> None:
    async def main() -> None:
        release = asyncio.Event()
        release.set()  # /stall sends its whole body at once
        transport = NodeTransport(max_connections=1, max_keepalive=1)
        reply = stalled_body_server_reply(release)
        async with raw_server(reply) as server, client_for(server, transport) as client:
            # straight on the transport, as the gateway sends: its body says when it has arrived
            r = await transport.handle_async_request(httpx.Request("GET", f"{server.url}/stall"))
            await wait_for(lambda: r.stream.at_end)  # all 8 bytes arrived; none is read
            await r.aclose()
            assert (await client.get("/next")).text == "/next"
            assert [q.connection for q in server.requests] == [0, 0]

    asyncio.run(main())


def test_pool_limit_makes_requests_wait_then_time_out() -> None:
    async def main() -> None:
        release = asyncio.Event()
        transport = NodeTransport(max_connections=1, max_keepalive=1)
        reply = stalled_body_server_reply(release)
        async with raw_server(reply) as server, client_for(server, transport) as client:
            async with client.stream("GET", "/stall") as r:
                with pytest.raises(httpx.PoolTimeout):
                    await client.get("/next", timeout=httpx.Timeout(5.0, pool=0.1))
                waiting = asyncio.create_task(client.get("/queued"))
                await asyncio.sleep(0.05)
                assert not waiting.done()
                release.set()
                assert await r.aread() == b"halfrest"
            assert (await waiting).text == "/queued"
            assert server.connections == 1

    asyncio.run(main())
