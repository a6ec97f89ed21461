"""Node addresses by name: the gateway resolves a node's host name on every new connection, and a
failed connect makes the instance's next attempt resolve it again rather than reuse a connection
to the address it had before (a pod restarted under its name, with a new IP).

Cluster DNS is stood in for by an injected resolver (`Names`) that maps names to loopback
addresses; the two "pods" behind one name are real servers on 127.0.0.2 and 127.0.0.3, on the same
port, as two incarnations of one pod would be.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from api.settings import GatewaySettings, Instance
from gateway.app import create_app
from gateway.context import Gateway
from gateway.transport import NodeTransport

from .servers import ServerThread, bound_socket
from .standin import StandIn
from .test_transport import RawServer, Request, response

pytestmark = pytest.mark.timeout(60)

OLD, NEW, NOBODY = "127.0.0.2", "127.0.0.3", "127.0.0.4"
COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 3}


class Names:
    """A resolver with a table: names map to one address; anything else resolves to itself."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = dict(table)
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return [self.table.get(host, host)]


def shared_port() -> int:
    """A port free on both OLD and NEW."""
    for _ in range(20):
        with bound_socket(0, OLD) as a:
            port = a.getsockname()[1]
            try:
                bound_socket(port, NEW).close()
            except OSError:
                continue
            return port
    raise AssertionError("no port free on both 127.0.0.2 and 127.0.0.3")


def test_a_failed_connect_makes_the_next_attempt_resolve_again() -> None:
    names = Names({"node-test": OLD})
    release = asyncio.Event()

    async def old_reply(request: Request) -> bytes:
        if request.path == "/held":
            await release.wait()
        return response(b"old")

    async def new_reply(request: Request) -> bytes:
        return response(b"new")

    async def main() -> None:
        port = shared_port()
        old, new = RawServer(old_reply), RawServer(new_reply)
        listeners = [
            await asyncio.start_server(old.serve, OLD, port),
            await asyncio.start_server(new.serve, NEW, port),
        ]
        transport = NodeTransport(max_connections=16, max_keepalive=16, resolve=names)
        base = f"http://node-test:{port}"
        async with httpx.AsyncClient(transport=transport, base_url=base, timeout=5) as client:
            held = asyncio.create_task(client.get("/held"))  # busy on a connection to OLD
            while not old.requests:
                await asyncio.sleep(0.01)
            names.table["node-test"] = NOBODY  # the pod is gone: nothing listens there
            with pytest.raises(httpx.ConnectError, match="node-test"):
                await client.get("/refused")
            release.set()
            assert (await held).text == "old"  # its connection is not kept for reuse
            names.table["node-test"] = NEW  # the pod is back, elsewhere
            assert (await client.get("/after")).text == "new"
        for listener in listeners:
            listener.close()
        assert [r.path for r in old.requests] == ["/held"]
        assert [r.path for r in new.requests] == ["/after"]
        assert names.asked == ["node-test"] * 3

    asyncio.run(main())


def test_a_name_that_cannot_be_resolved_is_a_connect_error_naming_it() -> None:
    async def nowhere(host: str, port: int) -> list[str]:
        raise OSError(-2, "Name or service not known")

    async def main() -> None:
        transport = NodeTransport(max_connections=4, max_keepalive=4, resolve=nowhere)
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            with pytest.raises(httpx.ConnectError, match=r"cannot resolve node host 'gone\.test'"):
                await client.get("http://gone.test:1/health")

    asyncio.run(main())


@contextmanager
def served(standin: StandIn, host: str, port: int) -> Iterator[ServerThread]:
    server = ServerThread(standin.app(), port, host).start()
    try:
        yield server
    finally:
        server.stop()


def ask(client: httpx.Client) -> str:
    """Which stand-in answered a completion through the gateway."""
    answer = client.post("/v1/completions", json=COMPLETION)
    assert answer.status_code == 200, answer.text
    return answer.json()["node"]


def named_gateway(names: Names, decode_url: str) -> ServerThread:
    """A gateway (admin key "admin") in front of one decode node given by name."""
    settings = GatewaySettings(
        decode=(Instance(decode_url),), admin_key="admin", health_interval_s=60.0
    )
    gw = Gateway(settings, rng=random.Random(0), resolve=names)
    return ServerThread(create_app(settings, gw)).start()


def test_gateway_follows_a_decode_node_restarted_under_its_name() -> None:
    port = shared_port()
    names = Names({"decode-0.pods.test": OLD})
    before, after = StandIn("before"), StandIn("after")
    gateway = named_gateway(names, f"http://decode-0.pods.test:{port}")
    try:
        with httpx.Client(base_url=gateway.url, timeout=30, trust_env=False) as c:
            with served(before, OLD, port):
                assert ask(c) == "before"
            names.table["decode-0.pods.test"] = NEW
            with served(after, NEW, port):
                assert ask(c) == "after"
                listing = c.get("/workers", headers={"Authorization": "Bearer admin"}).json()
        assert [w["url"] for w in listing["workers"]] == [f"http://decode-0.pods.test:{port}"]
    finally:
        gateway.stop()


def test_workers_added_by_name_at_run_time_are_resolved() -> None:
    port = shared_port()
    names = Names({"decode-0.pods.test": OLD, "decode-1.pods.test": NEW})
    first, second = StandIn("first"), StandIn("second")
    gateway = named_gateway(names, f"http://decode-0.pods.test:{port}")
    auth = {"Authorization": "Bearer admin"}
    try:
        with (
            served(first, OLD, port),
            served(second, NEW, port),
            httpx.Client(base_url=gateway.url, timeout=30, trust_env=False) as c,
        ):
            added = c.post(
                "/workers", json={"role": "decode", "url": f"http://decode-1.pods.test:{port}"},
                headers=auth,
            )  # fmt: skip
            assert added.status_code == 201, added.text
            removed = c.delete(f"/workers/http://decode-0.pods.test:{port}", headers=auth)
            assert removed.status_code == 200, removed.text
            answer = c.post("/v1/completions", json=COMPLETION)
            assert answer.status_code == 200 and answer.json()["node"] == "second"
        assert "decode-1.pods.test" in names.asked
    finally:
        gateway.stop()
