"""A rank group across two "hosts": two groups of processes on loopback that meet at
dist_init_addr (SGLang's nnodes / node_rank / dist_init_addr), through the `pdserve` CLI: a
node serving HTTP whose second half runs no API, and the offline `generate` under DP attention
(each host's rank runs its own prompt's attention)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx

from tests.e2e.cluster_util import REPO, free_ports

PROMPTS = ["Hello there", "Rank groups span hosts"]


def pdserve(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def generate(model: str, *flags: str) -> subprocess.Popen:
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    return pdserve("generate", "--model", model, *prompts, "--max-tokens", "6", "--json", *flags)


def outputs(proc: subprocess.Popen) -> list[list[int]]:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line)["token_ids"] for line in out.splitlines()]


def group_flags(port: int, node_rank: int) -> list[str]:
    return ["--tp-size", "2", "--nnodes", "2", "--node-rank", str(node_rank),
            "--dist-init-addr", f"127.0.0.1:{port}"]  # fmt: skip


def test_node_across_two_hosts_serves_and_its_ranks_leave_with_it(make_tiny) -> None:
    model = str(make_tiny("llama"))
    expected = outputs(generate(model))
    dist_port, http_port = free_ports(2)
    node = ["decode", "--model", model, "--transfer-backend", "none"]
    second = pdserve(*node, *group_flags(dist_port, 1))
    first = pdserve(*node, "--port", str(http_port), *group_flags(dist_port, 0))
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert first.poll() is None, first.stderr.read()[-3000:] if first.stderr else ""
            time.sleep(0.2)
        info = httpx.get(f"{url}/get_server_info", timeout=10).json()
        assert info["tp_size"] == 2 and info["ranks"] == []  # rank 1 runs on the other "host"
        for prompt, tokens in zip(PROMPTS, expected, strict=True):
            body = {"text": prompt, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
            r = httpx.post(f"{url}/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == tokens
    finally:
        first.terminate()
        first.wait(timeout=60)
    assert second.wait(timeout=60) == 0, second.stderr.read()[-3000:] if second.stderr else ""


def test_dp_attention_across_two_hosts_equals_one_rank(make_tiny) -> None:
    """`--dp-attention`: each host's rank runs its own prompt's attention, the experts meet."""
    model = str(make_tiny("deepseek_v3", "deepseek", layers=3))
    expected = outputs(generate(model))
    (port,) = free_ports(1)
    dp = ["--ep-size", "2", "--dp-attention"]
    second = generate(model, *group_flags(port, 1), *dp)
    first = generate(model, *group_flags(port, 0), *dp)
    assert outputs(first) == expected
    second.communicate(timeout=60)
    assert second.returncode == 0


def test_rank_0_says_which_ranks_of_other_hosts_it_waits_for(monkeypatch, caplog) -> None:
    """Started alone (the other host's command not run), rank 0 names the missing ranks and
    the command that starts them, once, then fails at dist_timeout_s."""
    import logging
    from datetime import timedelta

    import pytest
    import torch.distributed as dist

    from engine.options import EngineOptions
    from engine.parallel import worker

    monkeypatch.setattr(worker, "REMOTE_RANKS_REMINDER_S", 0.1)
    store = dist.TCPStore("127.0.0.1", 0, 4, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=5))  # fmt: skip
    store.set("joined/1", "1")  # this host's other rank; ranks 2 and 3 live on the other host
    addr = f"127.0.0.1:{store.port}"
    options = EngineOptions(tp_size=4, nnodes=2, dist_init_addr=addr, dist_timeout_s=0.5)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="did not gather"):
        worker.wait_for_ranks(store, options, [])
    said = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert said == [
        "waiting up to 0.5s for ranks 2,3 from the other hosts (each starts the same node with "
        f"--nnodes 2 --node-rank N --dist-init-addr {addr})"
    ]
