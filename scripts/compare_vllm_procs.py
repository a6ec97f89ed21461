"""Running one setup of scripts/compare_vllm.py: each process in its own process group with
its output in a log file, polled until it answers its ready URL, and stopped so that nothing of
the setup outlives it (SIGTERM to each root, then SIGKILL to every process seen, and a check)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil
from compare_vllm_setups import REPO, Proc, Setup


@dataclass
class Running:
    setup: Setup
    log_dir: Path
    popens: list[tuple[Proc, subprocess.Popen]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    def log_of(self, proc: Proc) -> Path:
        return self.log_dir / f"{proc.name}.log"


def start(setup: Setup, log_dir: Path) -> Running:
    """Every process of `setup` in its own session (process group), output into log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    running = Running(setup, log_dir)
    for proc in setup.procs:
        log = running.log_of(proc).open("wb")
        running.logs.append(log)
        popen = subprocess.Popen(
            proc.argv,
            cwd=REPO,
            env={**os.environ, **proc.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        running.popens.append((proc, popen))
    return running


class NotReady(RuntimeError):
    """A process exited or did not answer its ready URL in time; the message names its log."""


def wait_ready(running: Running, timeout_s: float) -> float:
    """Seconds until every process answers 200 on its ready URL (polled, no fixed sleep)."""
    began = time.monotonic()
    waiting = list(running.popens)
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while waiting:
            for proc, popen in list(waiting):
                if popen.poll() is not None:
                    raise NotReady(
                        f"{proc.name} exited ({popen.returncode}): {tail(running, proc)}"
                    )
                if answers(client, proc.ready_url):
                    waiting.remove((proc, popen))
            if time.monotonic() - began > timeout_s:
                names = ", ".join(p.name for p, _ in waiting)
                raise NotReady(
                    f"not ready within {timeout_s:g} s: {names} (logs: {running.log_dir})"
                )
            if waiting:
                time.sleep(0.5)
    return time.monotonic() - began


def answers(client: httpx.Client, ready_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return client.get(ready_url).status_code == 200
    return False


def tail(running: Running, proc: Proc, chars: int = 1500) -> str:
    return running.log_of(proc).read_text(errors="replace")[-chars:]


def family(popens: Sequence[subprocess.Popen]) -> list[psutil.Process]:
    """The processes of a setup now: each root and every descendant."""
    found = []
    for popen in popens:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(popen.pid)
            found += [root, *root.children(recursive=True)]
    return found


def idle_cores(running: Running, window_s: float = 3.0) -> float:
    """CPU cores the setup burns with no request in flight (polling threads and the like), over
    `window_s`: on a 2-core machine, what it takes from the engines before any work."""
    members = family([p for _, p in running.popens])
    for proc in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.cpu_percent(None)
    time.sleep(window_s)
    used = 0.0
    for proc in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            used += proc.cpu_percent(None)
    return round(used / 100.0, 2)


def stop(running: Running, grace_s: float) -> int:
    """SIGTERM each root (pdserve's launcher and vLLM's api_server stop their own children),
    then SIGKILL whatever of the setup is left after `grace_s`: every process seen before the
    SIGTERM, and the process groups of the roots they are in. Returns how many were killed."""
    popens = [p for _, p in running.popens]
    members = family(popens)
    for popen in popens:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    roots = {popen.pid for popen in popens}
    groups = {pgid for proc in alive if (pgid := group_of(proc)) in roots}
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    for pgid in groups:  # NOTE: only groups seen alive: a gone group's id may be reused
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    for popen in popens:
        popen.wait()
    psutil.wait_procs(alive, timeout=10)
    for log in running.logs:
        log.close()
    if left := [p.pid for p in members if still_running(p)]:
        raise RuntimeError(f"{running.setup.name}: processes still alive after SIGKILL: {left}")
    return len(alive)


def group_of(proc: psutil.Process) -> int | None:
    with contextlib.suppress(ProcessLookupError):
        return os.getpgid(proc.pid)
    return None


def still_running(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False
