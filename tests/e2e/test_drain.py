"""Draining on SIGTERM, on real processes over loopback: a 2P2D cluster whose components this file
starts itself, each in its own process group (the signal goes to the whole group, as the launcher
sends it: the scheduler process gets it too).

A draining node answers /health with 503 "draining" and refuses new work the same way, finishes
what it holds, and exits 0; the gateway sends new requests elsewhere. What a node holds is made
certain, not left to timing: a PD request sent to one side by hand, whose other side is sent only
once the drain has been seen (`Held`). The tests share the cluster and run in file order: decode
drain, prefill drain, a drain that times out, the gateway's own drain.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.cluster_util import cluster_yaml
from tests.e2e.test_faults import (
    LONG,
    SHORT,
    Component,
    Nodes,
    Outcome,
    assert_openai_error,
    complete,
    completion,
    healthy_in,
    served,
    wait_pages_free,
    wait_until,
)

pytestmark = pytest.mark.slow

STREAMS = 4  # through the gateway while a node drains: round robin puts half on each node
SIGNAL_TIMEOUT_S = 60.0  # a signalled process exits within this (it holds nothing by then)
# Transfer timeouts long enough for a held request to wait on its other side, short aborts so
# that an aborted room ends at once on the live side.
TRANSFER = {
    "bootstrap_timeout_s": 120.0,
    "abort_timeout_s": 3.0,
    "heartbeat_interval_s": 0.5,
    "heartbeat_timeout_s": 3.0,
    "quarantine_s": 1.0,
}
DRAINED = re.compile(r"drained: free_pages=(\d+) total_pages=(\d+) ")


@dataclass
class Cluster:
    nodes: Nodes
    config: dict

    @property
    def gateway(self) -> str:
        return self.nodes.gateway

    def node(self, name: str) -> Component:
        return self.nodes.components[name]

    def bootstrap_port(self, prefill: str) -> int:
        return next(p["bootstrap_port"] for p in self.config["prefill"] if p["name"] == prefill)


@pytest.fixture(scope="module")
def cluster(make_tiny, tmp_path_factory) -> Iterator[Cluster]:
    model = make_tiny("llama")
    # NOTE: the gateway's health settings are the defaults: a draining node is out at once
    config = cluster_yaml(
        model, "mooncake", 2, 2, prefill_policy="round_robin", decode_policy="round_robin"
    )
    config["transfer"].update(TRANSFER)
    path = tmp_path_factory.mktemp("drain-2p2d") / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    nodes = Nodes(model, path)
    try:
        for role in ("prefill", "decode"):
            for node in config[role]:
                nodes.add(role, node["name"], node["port"]).start()
        for component in list(nodes.components.values()):
            component.wait_healthy()
        nodes.add("gateway", "gateway", config["gateway"]["port"]).start()
        nodes.components["gateway"].wait_healthy(60)
        yield Cluster(nodes, config)
    finally:
        nodes.stop_all()


# ---- a request that a node holds until the test lets it go ----------------------------------


@dataclass
class Held:
    """One PD request sent by hand: `first` gets its half now and waits for its peer (the room);
    `release()` sends the other half to `second`, and the transfer ends the wait."""

    first: str
    second: str
    body: dict[str, Any]

    @classmethod
    def make(cls, first: str, second: str, bootstrap_port: int, prompt: str) -> Held:
        room = random.getrandbits(63)
        body = completion(prompt, SHORT, stream=False, native=True)
        pd = {"bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap_port}
        body.update(pd, bootstrap_room=room, rid=f"held-{room}")
        return cls(first, second, body)

    async def send(self, client: httpx.AsyncClient) -> asyncio.Future[Outcome]:
        """The first half, once `first` holds it (its room is open there)."""
        before = await asyncio.to_thread(pending, self.first)
        sent = asyncio.ensure_future(complete(client, self.first, self.body))
        await asyncio.to_thread(
            wait_until, lambda: pending(self.first) > before, f"a room held on {self.first}", 60
        )
        return sent

    async def release(self, client: httpx.AsyncClient) -> Outcome:
        return await complete(client, self.second, self.body)


def pending(url: str) -> int:
    """Requests a node holds outside its engine's batch: rooms in transfer, pages awaited."""
    info = httpx.get(f"{url}/get_server_info", timeout=10).json()
    return int(info.get("transferring", 0)) + int(info.get("prealloc", 0))


def says_draining(url: str) -> bool:
    r = httpx.get(f"{url}/health", timeout=5)
    return r.status_code == 503 and r.json() == {"status": "draining"}


def assert_draining_error(error: Any) -> None:
    """The node's error as the gateway (and its migration) reads it: code "draining"."""
    assert assert_openai_error({"error": error}, "server_error")["code"] == "draining", error


def exit_code(component: Component) -> int:
    assert component.proc is not None
    return component.proc.wait(timeout=SIGNAL_TIMEOUT_S)


def drained_pages(log: Path, offset: int) -> tuple[int, int]:
    """(free, total) pages of the node's "drained:" log line, written after `offset`."""
    found = DRAINED.search(log.read_text()[offset:])
    assert found, f"no drained line in {log}"
    return int(found.group(1)), int(found.group(2))


# ---- a node drains what it holds -------------------------------------------------------------


@dataclass
class Drained:
    streams: list[Outcome]  # through the gateway, begun before the signal
    during: list[Outcome]  # through the gateway, sent while the node drained
    served_during: int  # of those, how many the live node of the victim's role answered
    refused: httpx.Response  # sent to the draining node itself
    held: tuple[Outcome, Outcome]  # (first half, second half)


async def drain_under_load(
    cluster: Cluster, victim: Component, live: Component, held: Held
) -> Drained:
    """`held` on `victim` and streams through the gateway; SIGTERM once all are under way; then,
    once /health says it drains, new requests through the gateway and `held`'s release."""
    gateway = cluster.gateway
    bodies = [
        completion(f"Drain stream {i}: " + "a long story " * (i + 1), LONG, True)
        for i in range(STREAMS)
    ]
    during = [
        completion(f"During the drain {i}", SHORT, stream=i % 2 == 0, native=i % 4 >= 2)
        for i in range(4)
    ]
    async with httpx.AsyncClient(timeout=300) as client:
        first = await held.send(client)  # NOTE: first: `send` counts the rooms on `victim`
        started = [asyncio.Event() for _ in bodies]
        streams = [
            asyncio.ensure_future(complete(client, gateway, body, ev))
            for body, ev in zip(bodies, started)
        ]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
        victim.signal(signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: says_draining(victim.url), "503 draining", 30)
        refused = await client.post(
            f"{victim.url}/v1/completions", json=completion("Too late", SHORT, False)
        )
        before = await asyncio.to_thread(served, live.url)
        done_during = await asyncio.gather(*(complete(client, gateway, b) for b in during))
        served_during = await asyncio.to_thread(served, live.url) - before
        second = await held.release(client)
        outcomes = await asyncio.gather(*streams)
        return Drained(outcomes, list(done_during), served_during, refused, (await first, second))


def assert_drained(cluster: Cluster, victim: Component, got: Drained) -> None:
    assert [(o.status, o.error, o.tokens) for o in got.streams] == [(200, None, LONG)] * STREAMS
    assert [(o.status, o.error, o.tokens) for o in got.during] == [(200, None, SHORT)] * 4
    assert got.served_during == 4  # every one of them went to the live node
    assert [(o.status, o.error) for o in got.held] == [(200, None)] * 2
    # the prefill half answers the first token, the decode half every token
    assert sorted(o.tokens or 0 for o in got.held) == [1, SHORT]
    assert got.refused.status_code == 503, got.refused.text
    assert_draining_error(got.refused.json()["error"])
    assert exit_code(victim) == 0
    # the gateway keeps it out: it said it drains, then it stopped answering
    assert not healthy_in(cluster.gateway, victim.url)


def test_decode_drain_finishes_what_it_holds_and_exits_0(cluster: Cluster) -> None:
    victim, live = cluster.node("decode-1"), cluster.node("decode-0")
    # decode-1 holds a room whose KV comes from prefill-0 once the drain is seen
    held = Held.make(
        victim.url, cluster.node("prefill-0").url, cluster.bootstrap_port("prefill-0"), "Held"
    )
    got = asyncio.run(drain_under_load(cluster, victim, live, held))
    assert_drained(cluster, victim, got)
    nodes = ("prefill-0", "prefill-1", "decode-0")
    wait_pages_free([cluster.node(n).url for n in nodes])


def test_prefill_drain_finishes_what_it_holds_and_exits_0(cluster: Cluster) -> None:
    victim, live = cluster.node("prefill-1"), cluster.node("prefill-0")
    # prefill-1 holds a computed room that waits for decode-0 to ask for it
    held = Held.make(
        victim.url, cluster.node("decode-0").url, cluster.bootstrap_port("prefill-1"), "Held"
    )
    got = asyncio.run(drain_under_load(cluster, victim, live, held))
    assert_drained(cluster, victim, got)
    wait_pages_free([cluster.node(n).url for n in ("prefill-0", "decode-0")])


# ---- a drain that times out ------------------------------------------------------------------

TIMEOUT_S = 0.5


def test_drain_timeout_ends_what_is_left_with_a_draining_error(cluster: Cluster) -> None:
    """decode-1 again, with a short drain_timeout_s: a stream that cannot finish in time ends
    with an SSE error event of code "draining", a request still waiting for its KV with a 503 of
    that code; both are aborted on its scheduler, which holds no page when the node exits 0."""
    running = cluster.node("decode-1")
    if running.proc is not None and running.proc.poll() is None:  # this test alone: stop it
        running.signal(signal.SIGTERM)
        assert exit_code(running) == 0
    port = cluster.config["decode"][1]["port"]
    sets = (f"decode.1.drain_timeout_s={TIMEOUT_S}",)
    victim = cluster.nodes.add("decode", "decode-1", port, sets)
    offset = victim.log.stat().st_size
    victim.start()
    victim.wait_healthy()
    # NOTE: a colocated stream of (almost) the whole context: well over TIMEOUT_S of decoding
    # here, where a stream makes ~1000 tokens a second
    max_model_len = httpx.get(f"{victim.url}/get_model_info", timeout=10).json()["max_model_len"]
    stream = completion("Cut short", max_model_len - 64, stream=True, native=True)
    # never released: prefill-0 never gets its half
    held = Held.make(victim.url, "", cluster.bootstrap_port("prefill-0"), "Never prefilled")

    async def run() -> tuple[list[str], Outcome]:
        async with httpx.AsyncClient(timeout=120) as client:
            waiting = await held.send(client)
            async with client.stream("POST", f"{victim.url}/generate", json=stream) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                events = [await anext(lines)]
                victim.signal(signal.SIGTERM)
                events += [line async for line in lines]
            return [e for e in events if e.startswith("data: ")], await waiting

    events, refused = asyncio.run(run())
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    assert_draining_error(last.get("error"))
    tokens = json.loads(events[-3][len("data: ") :])["meta_info"]["completion_tokens"]
    assert 0 < tokens < stream["sampling_params"]["max_new_tokens"]
    assert refused.status == 503
    assert_draining_error(refused.error)
    assert exit_code(victim) == 0
    free, total = drained_pages(victim.log, offset)
    assert free == total
    wait_pages_free([cluster.node(n).url for n in ("prefill-0", "decode-0")])


# ---- the gateway drains its streams ----------------------------------------------------------


def test_gateway_sigterm_finishes_its_streams_and_exits_0(cluster: Cluster) -> None:
    gateway = cluster.node("gateway")
    bodies = [completion(f"Through the gateway {i}", LONG, True) for i in range(2)]

    def refuses_connections() -> bool:
        try:
            httpx.get(f"{gateway.url}/health", timeout=5)
        except httpx.ConnectError:
            return True
        return False

    async def run() -> list[Outcome]:
        async with httpx.AsyncClient(timeout=300) as client:
            started = [asyncio.Event() for _ in bodies]
            streams = [
                asyncio.ensure_future(complete(client, gateway.url, body, ev))
                for body, ev in zip(bodies, started)
            ]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
            gateway.signal(signal.SIGTERM)
            await asyncio.to_thread(wait_until, refuses_connections, "gateway closed", 30)
            return await asyncio.gather(*streams)

    outcomes = asyncio.run(run())
    assert [(o.status, o.error, o.tokens) for o in outcomes] == [(200, None, LONG)] * 2
    assert exit_code(gateway) == 0
