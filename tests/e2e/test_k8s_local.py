"""What `pdserve k8s` renders runs: each rendered container's command, arguments and environment
started as a local process, with the cluster config from the rendered ConfigMap, gives a working
1P1D that returns transformers' greedy tokens. Each pod's DNS name is mapped to its own loopback
address (127.0.0.2, 127.0.0.3, ...), standing in for cluster DNS.

The gateway binds a loopback address of its own too, and the cluster runs over Mooncake and
over NIXL: a 1P1D whose prefill, decode and gateway each bind their own address works over both
one-sided transfer engines (nothing assumes 127.0.0.1), and listens only where configured.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from engine.tokenizer import load_tokenizer
from tests.e2e.cluster_util import REPO, cluster_yaml, free_ports
from tests.test_engine_oracle import MAX_NEW, hf_reference

pytestmark = pytest.mark.slow

CONFIG_PATH = "/etc/pdserve/cluster.yaml"  # where the rendered pods read the config
PROMPT = "Pods find each other by name: "
START_TIMEOUT_S = 180.0


def render(config: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Every object `pdserve k8s` renders for `config`."""
    source, out = tmp / "source.yaml", tmp / "k8s"
    source.write_text(yaml.safe_dump(config))
    run = [sys.executable, "-m", "cluster.cli", "k8s", str(source), "--out", str(out)]
    subprocess.run(run, cwd=REPO, check=True, capture_output=True, text=True)
    docs = (yaml.safe_load_all(p.read_text()) for p in sorted(out.glob("*.yaml")))
    return [doc for file in docs for doc in file if doc and "kind" in doc]


def local_config(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """The ConfigMap's cluster config with each node's pod DNS name replaced by a loopback
    address of its own and the gateway on the next one at a free port; and that name map."""
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["cluster.yaml"])
    nodes = config["prefill"] + config["decode"]
    addresses = {node["host"]: f"127.0.0.{2 + i}" for i, node in enumerate(nodes)}
    for node in nodes:
        assert node["host"].endswith(".svc.cluster.local"), node["host"]
        node["host"] = addresses[node["host"]]
    config["gateway"].update(host=f"127.0.0.{2 + len(nodes)}", port=free_ports(1)[0])
    return config, addresses


def containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The main container of each StatefulSet and Deployment, by object name."""
    workloads = [o for o in objects if o["kind"] in ("StatefulSet", "Deployment")]
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0] for o in workloads
    }


def command_of(container: dict[str, Any], config_path: Path) -> list[str]:
    """The container's command line, run here: the mounted config path replaced by ours."""
    assert container["command"] == ["pdserve"], container["command"]
    args = [str(config_path) if a == CONFIG_PATH else a for a in container["args"]]
    assert str(config_path) in args, f"the container does not read {CONFIG_PATH}: {args}"
    return [shutil.which("pdserve") or "pdserve", *args]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {**os.environ, **{e["name"]: e["value"] for e in container.get("env", [])}}


@contextmanager
def processes(commands: dict[str, tuple[list[str], dict[str, str]]], logs: Path) -> Iterator[None]:
    """Each named command as a process of its own group, all stopped on the way out."""
    started: list[subprocess.Popen] = []
    try:
        for name, (command, env) in commands.items():
            started.append(spawn(command, env, logs / f"{name}.log"))
        yield
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError):  # what it left behind (its scheduler)
                os.killpg(proc.pid, signal.SIGKILL)


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # NOTE: the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def wait_healthy(urls: list[str], logs: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for url in urls:
        while not healthy(url):
            if time.monotonic() > deadline:
                tails = "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in logs.glob("*.log"))
                raise AssertionError(f"{url} not healthy in {START_TIMEOUT_S}s\n{tails}")
            time.sleep(0.5)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def assert_greedy_equals_transformers(gateway: str, model: Path) -> None:
    """A greedy completion through the gateway is transformers' greedy continuation."""
    ids = load_tokenizer(model)(PROMPT)["input_ids"]
    params = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    answer = httpx.post(
        f"{gateway}/generate", json={"text": PROMPT, "sampling_params": params}, timeout=120
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["output_ids"] == hf_reference(str(model), tuple(ids))[0]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0}
    completion = httpx.post(f"{gateway}/v1/completions", json={**body, "ignore_eos": True})
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] == answer.json()["text"]


@pytest.mark.parametrize("backend", ["mooncake", "nixl"])
def test_rendered_manifests_run_as_a_working_cluster(backend: str, make_tiny, tmp_path) -> None:
    model = make_tiny("llama")
    source = cluster_yaml(model, backend, prefill=1, decode=1)
    source["engine"]["threads"] = 1  # NOTE: each node is alone on its host: 2 cores for 2 nodes
    objects = render(source, tmp_path)
    config, addresses = local_config(objects)
    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    rendered = containers(objects)
    nodes = [n["name"] for n in config["prefill"] + config["decode"]]
    assert set(rendered) == {*nodes, "gateway"}, sorted(rendered)
    logs = tmp_path / "logs"
    logs.mkdir()
    commands = {name: (command_of(c, config_path), env_of(c)) for name, c in rendered.items()}
    node_urls = [f"http://{n['host']}:{n['port']}" for n in config["prefill"] + config["decode"]]
    gateway = f"http://{config['gateway']['host']}:{config['gateway']['port']}"
    with processes(commands, logs):  # NOTE: all at once, as the pods start
        wait_healthy([*node_urls, gateway], logs)
        assert_greedy_equals_transformers(gateway, model)
        prefill = config["prefill"][0]
        for port in (prefill["port"], prefill["bootstrap_port"]):  # bound where configured only
            assert accepts(prefill["host"], port) and not accepts("127.0.0.1", port)
        assert not accepts("127.0.0.1", config["gateway"]["port"])
    assert len({*addresses.values(), config["gateway"]["host"]}) == len(nodes) + 1


def accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True
