"""The `run` fixture: a supervisor process over stand-in components (tests/cluster/test_launch.py's
Run), for test_launch.py and test_revive.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.cluster.test_launch import Run, alive


@pytest.fixture
def run(tmp_path: Path):
    started = Run(tmp_path)
    yield started
    if getattr(started, "proc", None) is not None and started.proc.poll() is None:
        started.proc.kill()
        started.proc.wait()
    for stand_in in started.stand_ins:  # never leave a process behind, even when a test fails
        if stand_in.pidfile.exists():
            for pid in stand_in.pids():
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
