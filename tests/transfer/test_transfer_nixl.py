"""NIXL's progress thread: it sleeps on UCX's events instead of spinning a core, and still
moves a room when UCX runs over TCP alone (the transport where the written side must make
progress itself, as between hosts)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from transfer import TransferState
from transfer.config import TransferConfig
from transfer.nixl import NixlBackend

from .conftest import Cluster
from .test_transfer_engines import META

pytest.importorskip("nixl_cu12", reason="needs NIXL")


def threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def cpu_ticks(tids: set[str]) -> int:
    """user + system clock ticks the threads `tids` of this process have run."""
    total = 0
    for tid in tids:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def test_an_idle_agent_does_not_spin_a_core() -> None:
    before = threads()
    backend = NixlBackend.from_config(TransferConfig(backend="nixl"))
    try:
        assert backend.progress_delay_us == TransferConfig().nixl_progress_delay_us > 0
        agent_threads = threads() - before
        assert agent_threads  # the progress thread (and UCX's) run
        ticks, wall = cpu_ticks(agent_threads), time.monotonic()
        time.sleep(1.0)
        used_s = (cpu_ticks(agent_threads) - ticks) / os.sysconf("SC_CLK_TCK")
        # NOTE: a spinning progress thread runs the whole second here (measured 1.0), or its
        # share of a loaded machine; a sleeping one about 0.01
        assert used_s / (time.monotonic() - wall) < 0.25
    finally:
        backend.close()


def test_rooms_move_over_ucx_tcp_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_TLS", "tcp")  # the decode child inherits it
    cluster = Cluster("nixl")
    try:
        rooms = [random.getrandbits(62) for _ in range(4)]
        expected = {}
        for room in rooms:
            expected[room] = cluster.prefill.open("mha", room, 300)
            cluster.decode.open("mha", room, cluster.prefill.address("mha"), 300)
            cluster.prefill.send(room, META)
        assert all(s.state is TransferState.SUCCESS for s in cluster.prefill.wait(rooms).values())
        for room, (status, landed) in cluster.decode.wait(rooms).items():
            assert status.state is TransferState.SUCCESS, status.reason
            assert landed == expected[room]
        assert cluster.problems() == []
    finally:
        cluster.close()
