"""`pdserve launch` brings back a node killed with kill -9 while the rest of the cluster serves.

One 2P2D cluster of the tiny model: decode-1's process group is killed (its HTTP and scheduler
processes together, found through `launch-state.json`), the launcher restarts it, the gateway
takes it back, and requests reach it again; then the same for prefill-1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster_util import Cluster, cluster_yaml, launched

pytestmark = pytest.mark.slow

ADMIN_KEY = "sk-admin-restarts"
REQUESTS = 4  # round robin: half of them reach each node of a role


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if result := check():
                return result
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            pass  # a node or file in between states
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s")
        time.sleep(0.1)


def launch_state(logs: Path) -> dict[str, dict[str, Any]]:
    return json.loads((logs / "launch-state.json").read_text())["components"]


def healthy_workers(cluster: Cluster) -> set[str]:
    """The urls the gateway counts healthy (its admin route)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    listing = httpx.get(f"{cluster.url}/workers", headers=headers, timeout=10).json()
    return {w["url"] for w in listing["workers"] if w["healthy"]}


def served(url: str) -> int:
    """Generation requests a node answered with 200 (its /metrics; 0 after a restart)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(r'pdserve_node_requests_total\{[^}]*status="200"\} (\d+)', text)
    return sum(int(n) for n in found)


def gateway_retries(cluster: Cluster) -> int:
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    found = re.search(r"^pdserve_gateway_retries_total (\d+)", text, re.M)
    assert found, "no pdserve_gateway_retries_total in the gateway's /metrics"
    return int(found.group(1))


def complete_some(cluster: Cluster, tag: str) -> None:
    for i in range(REQUESTS):
        body = {"model": "tiny", "prompt": f"{tag} {i}", "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4


def kill_and_see_it_back(cluster: Cluster, logs: Path, name: str) -> None:
    """kill -9 `name`'s process group; the launcher restarts it, the gateway takes it back,
    and requests through the gateway reach it again."""
    node = next(
        n for n in cluster.config["prefill"] + cluster.config["decode"] if n["name"] == name
    )
    url = f"http://{node['host']}:{node['port']}"
    before = launch_state(logs)[name]
    assert before["state"] == "up" and before["pid"] == os.getpgid(before["pid"])
    os.killpg(before["pid"], signal.SIGKILL)

    back = {"state": "up", "restarts": before["restarts"] + 1}
    wait_until(lambda: back.items() <= launch_state(logs)[name].items(), f"{name} restarted")
    state = launch_state(logs)[name]
    assert state["pid"] != before["pid"] and state["last_exit"] == "was killed by SIGKILL"
    wait_until(lambda: url in healthy_workers(cluster), f"the gateway takes {name} back")
    retries = gateway_retries(cluster)
    complete_some(cluster, f"After {name} came back")
    # each node of the role got its half, and none failed over (a stale peer address would)
    assert served(url) == REQUESTS // 2, f"the restarted {name} did not serve its share"
    assert gateway_retries(cluster) == retries


def test_killed_nodes_are_restarted_and_serve_again(make_tiny, tmp_path: Path) -> None:
    config = cluster_yaml(
        make_tiny("llama"),
        "mooncake",
        prefill=2,
        decode=2,
        prefill_policy="round_robin",
        decode_policy="round_robin",
        health_interval_s=0.5,
        admin_key=ADMIN_KEY,
    )
    config["launch"] = {"restart_backoff_s": 0.2}
    logs = tmp_path / "logs"
    with launched(config, tmp_path, args=("--log-dir", str(logs))) as cluster:
        complete_some(cluster, "Before the kills")
        kill_and_see_it_back(cluster, logs, "decode-1")
        kill_and_see_it_back(cluster, logs, "prefill-1")
        launcher = cluster.log.read_text()
    for name in ("decode-1", "prefill-1"):
        assert (
            f"pdserve launch: component '{name}' was killed by SIGKILL; restarting it in 0.2s "
            "(restart 1 of 5 in 300s)"
        ) in launcher
        assert f"pdserve launch: component '{name}' is healthy again" in launcher
    assert cluster.proc.returncode == 0
