"""One run of one component: its process (group), its output copied to a log, its health check.

Each run is a session of its own (so its own process group): a terminal's Ctrl-C reaches only
the launcher, and a signal to the group reaches the processes the component started itself (a
node's scheduler process). On Linux each run also gets SIGTERM when the launcher dies, even by
SIGKILL (engine/parent_death.py), so it drains and goes instead of holding its ports as an
orphan. The launcher's view across runs is cluster/supervised.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from engine.parent_death import die_with_parent_preexec

TAIL_LINES = 30


@dataclass(frozen=True)
class Component:
    """One child process: a name for logs and errors, its command line, its health URL."""

    name: str
    argv: tuple[str, ...]
    health_url: str | None = None  # GET must answer 200 before the component counts as up
    stage: int = 0  # stages start in order, each once the one before is healthy
    # NOTE: the cluster serves while every named group keeps a component that has not been
    # given up on ("gateway", "decode", "prefill": cluster/launch.py's needed_roles); None: the
    # rest serve without this one (a prefill node where a decode node prefills itself)
    needed_group: str | None = None


class Child:
    """A running component: its process, and a thread that copies its output to the log sink."""

    def __init__(self, component: Component, sink: IO[str], lock: threading.Lock) -> None:
        self.component = component
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # NOTE: the kernel signals when the thread that started the child ends: the supervisor
        # starts every run from its main thread
        self.proc = subprocess.Popen(
            component.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent_preexec(signal.SIGTERM),
        )
        self.pump = threading.Thread(target=self.copy_output, args=(sink, lock), daemon=True)
        self.pump.start()

    def copy_output(self, sink: IO[str], lock: threading.Lock) -> None:
        prefix = f"[{self.component.name}] " if sink in (sys.stderr, sys.stdout) else ""
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.tail.append(line)
            with lock:
                sink.write(f"{prefix}{line}\n")
                sink.flush()

    def signal_group(self, signum: int) -> bool:
        """Send `signum` to the component's process group; False when the group is gone."""
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            return False
        except PermissionError:  # a reused id that is no longer ours
            return False
        return True

    def group_alive(self) -> bool:
        self.proc.poll()  # reap the leader, so a zombie does not keep the group alive
        return self.signal_group(0) and group_has_live_member(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the whole group (what a dead leader left behind, too) and reap the leader."""
        self.signal_group(signal.SIGKILL)
        self.proc.wait()

    def log_tail(self, errors_only: bool = False) -> str:
        """The last lines of its output, indented; `errors_only`: from its last line that says
        "error" on (a usage or config error's message, not the usage text or warnings before)."""
        self.pump.join(timeout=1.0)  # the last lines, written before the exit
        lines = list(self.tail) or ["(no output)"]
        if errors_only:
            said = [i for i, line in enumerate(lines) if "error" in line.lower()]
            lines = lines[said[-1] if said else -1 :]
        return "\n".join(f"    {line}" for line in lines)

    def exit_description(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


def group_has_live_member(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running (zombies do not count).

    NOTE: an orphaned grandchild is reparented to init, and where init does not reap (containers,
    microVMs) it stays a zombie: signalling the group still succeeds then, so /proc decides.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot), None when there is none (or it is
    a zombie): with the pid, it names one process even where pids are reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def health_error(url: str) -> str | None:
    """None when GET `url` answers 200, else what went wrong (proxies ignored: local checks)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2.0) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason)
