"""A cluster for the length of a `with`: `pdserve launch ARGS` in a child process.

The contract with cluster/launch.py: it prints `pdserve cluster ready: http://HOST:PORT/v1` on
stdout once every component is healthy, and stops every component on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..launch_settings import LaunchSettings

READY = re.compile(r"pdserve cluster ready: (\S+)")
# the launcher's own grace, for the gateway and then for the nodes (45 s each by default), + slack
STOP_GRACE_S = 2 * LaunchSettings.grace_s + 30.0
PDSERVE_LAUNCH = (sys.executable, "-m", "cluster.cli", "launch")


@dataclass(frozen=True)
class ClusterSpec:
    label: str  # names the cluster in tables, plots, JSONL lines and log dirs
    launch_args: tuple[str, ...]  # what follows `pdserve launch`
    command: tuple[str, ...] = PDSERVE_LAUNCH

    def describe(self) -> str:
        command = ("pdserve", "launch") if self.command == PDSERVE_LAUNCH else self.command
        return shlex.join((*command, *self.launch_args))


class LaunchFailed(RuntimeError):
    """The cluster did not come up; the message points at its logs."""


@contextlib.contextmanager
def launched(spec: ClusterSpec, log_dir: Path, timeout_s: float) -> Iterator[str]:
    """Yields the cluster's base URL (http://HOST:PORT); stops the cluster on the way out."""
    logs = log_dir / spec.label
    logs.mkdir(parents=True, exist_ok=True)
    argv = [*spec.command, *spec.launch_args]
    if spec.command == PDSERVE_LAUNCH:
        argv += ["--log-dir", str(logs)]
    print(f"[{spec.label}] {spec.describe()} (logs: {logs})", flush=True)
    with (logs / "launch.log").open("w") as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
        try:
            yield wait_ready(proc, spec, logs, timeout_s)
        finally:
            stop(proc)


def wait_ready(proc: subprocess.Popen, spec: ClusterSpec, logs: Path, timeout_s: float) -> str:
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break  # stdout closed: the launcher exited
        if match := READY.search(line):
            return match.group(1).rstrip("/").removesuffix("/v1")
    proc.poll()
    what = "did not print ready" if proc.returncode is None else f"exited ({proc.returncode})"
    raise LaunchFailed(
        f"[{spec.label}] `{spec.describe()}` {what} within "
        f"{timeout_s:g} s; see {logs}/launch.log and the component logs beside it"
    )


def pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the launcher stops its components), then SIGKILL the group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
