"""A tensor-parallel node under `pdserve launch`: one component (its ranks are its processes,
one log, one health), the same answers as a single-rank node, and a rank killed under load ends
that node alone: it exits non-zero at once, the gateway moves its streams to the other node
(clients see nothing), the launcher restarts it, and it serves again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.cluster_util import cluster_yaml, launched
from tests.e2e.test_faults import served
from tests.e2e.test_launch_restarts import (
    ADMIN_KEY,
    REQUESTS,
    STREAM_TOKENS,
    complete_some,
    healthy_workers,
    launch_state,
    load_bodies,
    load_on,
    node_url,
    streams_across,
    wait_until,
)

pytestmark = pytest.mark.slow


def node_down(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code != 200
    except httpx.HTTPError:
        return True


def kill_rank_under_streams(cluster, expected: list) -> float:
    """kill -9 of decode-0's rank 1 once the streams run: they all complete as if nothing
    happened. Returns how long the node took to go down."""
    url, took = node_url(cluster, "decode-0"), []

    def fault() -> None:
        load_on(url)
        (rank1,) = httpx.get(f"{url}/get_server_info", timeout=10).json()["ranks"]
        os.kill(rank1["pid"], signal.SIGKILL)
        start = time.monotonic()
        wait_until(lambda: node_down(url), "decode-0 goes down", timeout_s=30)
        took.append(time.monotonic() - start)

    got = asyncio.run(streams_across(cluster.url, load_bodies("Load"), fault))
    assert [text for _, text, _ in got] == [text for _, text, _ in expected]
    assert all(tokens == STREAM_TOKENS for _, _, tokens in got)
    return took[0]


def test_tp_node_serves_and_a_killed_rank_ends_only_that_node(make_tiny, tmp_path: Path) -> None:
    config = cluster_yaml(
        make_tiny("llama"),
        "none",
        prefill=0,
        decode=2,
        decode_policy="round_robin",
        health_interval_s=0.5,
        health_timeout_s=5.0,  # NOTE: a loaded 2-core machine can miss a check or two
        health_failures=4,
        admin_key=ADMIN_KEY,
    )
    config["decode"][0]["engine"] = {"tp_size": 2, "dist_timeout_s": 10}
    config["launch"] = {"restart_backoff_s": 0.2}
    logs = tmp_path / "logs"
    with launched(config, tmp_path, args=("--log-dir", str(logs))) as cluster:
        url = node_url(cluster, "decode-0")
        info = httpx.get(f"{url}/get_server_info", timeout=10).json()
        assert info["tp_size"] == 2 and len(info["ranks"]) == 1
        # round robin: each prompt once on the TP node and once on the single-rank one
        for i in range(2):
            body = {"model": "tiny", "prompt": f"Same answer {i}", "max_tokens": 12,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            texts = {
                httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60).json()[
                    "choices"
                ][0]["text"]
                for _ in range(2)
            }
            assert len(texts) == 1
        undisturbed = asyncio.run(streams_across(cluster.url, load_bodies("Load"), None))
        before = launch_state(logs)["decode-0"]
        assert kill_rank_under_streams(cluster, undisturbed) < 10  # the node went down at once
        wait_until(
            lambda: launch_state(logs)["decode-0"]["restarts"] == before["restarts"] + 1,
            "decode-0 exits and is restarted",
            timeout_s=30,
        )
        assert launch_state(logs)["decode-0"]["last_exit"] == "exited with code 1"
        wait_until(lambda: launch_state(logs)["decode-0"]["state"] == "up", "decode-0 back", 120)
        wait_until(lambda: url in healthy_workers(cluster), "the gateway takes decode-0 back")
        complete_some(cluster, "After the rank came back")
        assert served(url) == REQUESTS // 2
        assert launch_state(logs)["decode-1"]["restarts"] == 0  # no other node is affected
    log = (logs / "decode-0.log").read_text()
    assert "rank 1 exited with code -9" in log or "a step failed" in log  # whichever saw it first
