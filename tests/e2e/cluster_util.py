"""Launching a real cluster for a test: `pdserve launch` on free loopback ports."""

from __future__ import annotations

import json
import os
import socket
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

REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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
def launched(config: dict, tmp: Path, timeout_s: float = 240.0) -> Iterator[Cluster]:
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp / "launch.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "launch", str(path), "--timeout", str(timeout_s)],
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
