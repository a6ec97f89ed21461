"""Child processes that live and die together: start, wait until healthy, watch, stop.

Each component runs in its own session (so its own process group): a terminal's Ctrl-C reaches
only the supervisor, which then stops every group in order, and signals to a group reach the
processes a component started itself (a node's scheduler process). Stopping is SIGTERM to every
group, a grace period, then SIGKILL to whatever is left of them. When one component exits on its
own, the supervisor stops the others and reports which one died, with the end of its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

POLL_S = 0.1
TAIL_LINES = 30


@dataclass(frozen=True)
class Component:
    """One child process: a name for logs and errors, its command line, its health URL."""

    name: str
    argv: tuple[str, ...]
    health_url: str | None = None  # GET must answer 200 before the component counts as up
    stage: int = 0  # stages start in order, each once the one before is healthy


class ComponentFailed(RuntimeError):
    """A component exited, or did not become healthy in time."""

    def __init__(self, message: str, child: Child) -> None:
        super().__init__(message)
        self.child = child


class StopRequested(Exception):
    """SIGINT or SIGTERM reached the supervisor."""


class Child:
    """A running component: its process, and a thread that copies its output to the log sink."""

    def __init__(self, component: Component, sink: IO[str], lock: threading.Lock) -> None:
        self.component = component
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            component.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
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

    def log_tail(self) -> str:
        self.pump.join(timeout=1.0)  # the last lines, written before the exit
        lines = list(self.tail) or ["(no output)"]
        return "\n".join(f"    {line}" for line in lines)

    def exit_description(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


class Supervisor:
    """Runs components as one unit; `run` is the whole life cycle."""

    def __init__(
        self, components: list[Component], log_dir: Path | None = None, grace_s: float = 10.0
    ) -> None:
        self.components = components
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.children: list[Child] = []
        self.lock = threading.Lock()
        self.sinks: list[IO[str]] = []
        self.signal_received: int | None = None
        self.stopped = False

    def run(self, ready_message: str, timeout_s: float) -> int:
        """Start all, wait for health, print `ready_message`, watch; 0 after a requested stop."""
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start_stages(timeout_s)
            print(ready_message, flush=True)
            self.watch()
        except StopRequested:
            return 0
        except ComponentFailed as exc:
            self.stop_all()  # first: then its pipe is closed and its log complete
            tail = exc.child.log_tail()
            print(f"pdserve launch: {exc}; its log ends with:\n{tail}", file=sys.stderr, flush=True)
            return 1
        finally:
            self.stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0

    def on_signal(self, signum: int, frame: object) -> None:
        self.signal_received = signum  # NOTE: only a flag; the loops act on it between polls

    def check_stop(self) -> None:
        if self.signal_received is not None:
            raise StopRequested

    def start_stages(self, timeout_s: float) -> None:
        """Start every component, stage by stage, each stage once the one before is healthy."""
        deadline = time.monotonic() + timeout_s
        for stage in sorted({c.stage for c in self.components}):
            started = []
            for component in (c for c in self.components if c.stage == stage):
                self.check_stop()
                started.append(Child(component, self.sink_for(component), self.lock))
                self.children.append(started[-1])
            self.wait_healthy(started, deadline, timeout_s)

    def sink_for(self, component: Component) -> IO[str]:
        if self.log_dir is None:
            return sys.stderr
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sink = open(self.log_dir / f"{component.name}.log", "a", encoding="utf-8")  # noqa: SIM115
        self.sinks.append(sink)
        return sink

    def wait_healthy(self, children: list[Child], deadline: float, timeout_s: float) -> None:
        pending = [c for c in children if c.component.health_url]
        last_error: dict[str, str] = {}
        while pending:
            self.check_stop()
            self.check_exits()
            for child in list(pending):
                error = health_error(child.component.health_url or "")
                if error is None:
                    pending.remove(child)
                last_error[child.component.name] = error or ""
            if pending and time.monotonic() > deadline:
                child = pending[0]
                raise ComponentFailed(
                    f"component {child.component.name!r} did not become healthy at "
                    f"{child.component.health_url} within {timeout_s:g}s (last check: "
                    f"{last_error[child.component.name]})",
                    child,
                )
            if pending:
                time.sleep(POLL_S)

    def check_exits(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None:
                raise ComponentFailed(
                    f"component {child.component.name!r} {child.exit_description()}; "
                    "stopped the others",
                    child,
                )

    def watch(self) -> None:
        """Return never: raise StopRequested on a signal, ComponentFailed when a child exits."""
        while True:
            self.check_stop()
            self.check_exits()
            time.sleep(POLL_S)

    def stop_all(self) -> None:
        """SIGTERM to every group (last started first), grace, SIGKILL to what is left."""
        if self.stopped:
            return
        self.stopped = True
        for child in reversed(self.children):
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while any(c.group_alive() for c in self.children) and time.monotonic() < deadline:
            time.sleep(POLL_S / 2)
        for child in self.children:
            child.signal_group(signal.SIGKILL)
            child.proc.wait()
            child.pump.join(timeout=1.0)
        for sink in self.sinks:
            sink.close()


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
