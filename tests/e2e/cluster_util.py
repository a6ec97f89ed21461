"""Launching a real cluster for a test: `pdserve launch` on free loopback ports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.ports import free_ports

REPO = Path(__file__).resolve().parents[2]


def cluster_yaml(model: Path, backend: str, prefill: int, decode: int, **gateway: Any) -> dict:
    ports = iter(free_ports(1 + 2 * prefill + decode))
    return {
        "model": {"path": str(model)},
        "served_model_name": "tiny",
        "engine": {"dtype": "float32", "page_size": 16, "max_total_tokens": 16384},
        "transfer": {"backend": backend, "protocol": "tcp"},
        "gateway": {"host": "127.0.0.1", "port": next(ports), **gateway},
        "prefill": [
            {
                "name": f"prefill-{i}",
                "host": "127.0.0.1",
                "port": next(ports),
                "bootstrap_port": next(ports),
            }
            for i in range(prefill)
        ],
        "decode": [
            {"name": f"decode-{i}", "host": "127.0.0.1", "port": next(ports)} for i in range(decode)
        ],
    }


@dataclass
class Cluster:
    config: dict
    proc: subprocess.Popen
    log: Path
    model: Path | None = None
    extra: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['gateway']['port']}"

    def node_urls(self) -> list[str]:
        nodes = self.config["prefill"] + self.config["decode"]
        return [f"http://{n['host']}:{n['port']}" for n in nodes]

    def wait_pages_free(self, timeout_s: float = 30.0) -> list[dict]:
        """Every node's /get_server_info once no page is held; fails naming the node if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            infos = [httpx.get(f"{u}/get_server_info", timeout=10).json() for u in self.node_urls()]
            if all(i["free_pages"] == i["total_pages"] and i["held"] == 0 for i in infos):
                return infos
            if time.monotonic() > deadline:
                raise AssertionError(f"pages still held after load: {json.dumps(infos)}")
            time.sleep(0.2)


@contextmanager
def launched(
    config: dict, tmp: Path, timeout_s: float = 240.0, args: tuple[str, ...] = ()
) -> Iterator[Cluster]:
    """`pdserve launch` of `config` (more flags in `args`); its stderr goes to tmp/launch.log."""
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp / "launch.log"
    command = ["launch", str(path), "--timeout", str(timeout_s), *args]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *command],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    cluster = Cluster(config, proc, log)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if "pdserve cluster ready" not in line:
            proc.wait(timeout=30)
            raise AssertionError(f"cluster did not start: {line!r}\n{log.read_text()[-4000:]}")
        yield cluster
    finally:
        for extra in cluster.extra:
            extra.terminate()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for extra in cluster.extra:
            extra.wait(timeout=30)


LOAD_BODY = {"model": "tiny", "temperature": 0, "ignore_eos": True}


def node_requests(cluster: Cluster) -> int:
    """Generation requests the nodes have answered, any status, over every node (/metrics)."""
    total = 0
    for url in cluster.node_urls():
        text = httpx.get(f"{url}/metrics", timeout=10).text
        total += sum(
            int(n) for n in re.findall(r"^pdserve_node_requests_total\{.*\} (\d+)$", text, re.M)
        )
    return total


def make_load(cluster: Cluster, requests: int = 6) -> None:
    """Concurrent requests through the gateway, each checked as it ends: completions and chat,
    whole and streamed, and one stream dropped after its first event (the gateway then aborts
    it on both nodes; its max_tokens fills the context, so it is still running then unless the
    context is short). Returns once every node has answered its part of each request."""
    models = httpx.get(f"{cluster.url}/v1/models", timeout=30).json()["data"]
    longest = models[0]["max_model_len"] - 64
    before = node_requests(cluster)

    async def whole(client: httpx.AsyncClient, i: int) -> None:
        body = {**LOAD_BODY, "prompt": f"Load {i}: " + "pages " * (5 * i), "max_tokens": 8 + i}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8 + i

    async def streamed(client: httpx.AsyncClient, i: int) -> None:
        messages = [{"role": "user", "content": f"Stream {i}: " + "tokens " * (7 * i)}]
        body = {**LOAD_BODY, "messages": messages, "max_tokens": 8 + i, "stream": True}
        body["stream_options"] = {"include_usage": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "error" not in "".join(events)
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 8 + i

    async def dropped(client: httpx.AsyncClient) -> None:
        body = {**LOAD_BODY, "prompt": "Dropped mid-stream", "max_tokens": longest, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return  # leaving the block closes the stream mid-way

    async def run() -> None:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
            jobs = [whole(client, i) if i % 2 else streamed(client, i) for i in range(requests)]
            await asyncio.gather(dropped(client), *jobs)

    asyncio.run(run())
    # each request reached one prefill and one decode node; a node counts a request when its
    # answer ends (the dropped one's prefill answer may end a moment after the client left)
    expected, deadline = before + 2 * (requests + 1), time.monotonic() + 30
    while (seen := node_requests(cluster)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert seen == expected, f"the nodes answered {seen - before} requests, not {expected - before}"
