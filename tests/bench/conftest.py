"""A real colocated pdserve node (a decode node that prefills itself) for the benchmark to hit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.bench import datasets
from tests.ports import free_port

NODE_START_TIMEOUT_S = 240.0
HERE = Path(__file__).resolve().parent


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"node at {url} not healthy in {NODE_START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def tiny_model(make_tiny: Callable[..., Path]) -> Path:
    return make_tiny("llama")


@pytest.fixture(autouse=True)
def one_tokenizer_load(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tiny_tokenizer: Callable[[str], Any]
) -> None:
    """The tiny model's tokenizer, loaded once per session instead of once per run (a second
    apiece on this machine); test_datasets.py checks the real loader."""
    real = datasets.load_tokenizer

    def load(path: str) -> Any:
        return tiny_tokenizer("qwen") if Path(path) == tiny_model else real(path)

    monkeypatch.setattr(datasets, "load_tokenizer", load)


@pytest.fixture(scope="session")
def node_url(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real colocated node (colocated_node.py), answering /generate and /v1/*."""
    port, log = free_port(), tmp_path_factory.mktemp("bench-node") / "node.log"
    command = [sys.executable, str(HERE / "colocated_node.py"), str(tiny_model), str(port)]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
