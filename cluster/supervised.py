"""One component across its runs: the current run, its state, and its restart budget.

    starting -> up -> (exit) -> backoff -> starting -> up ...
                          \\-> given_up, once the budget of restarts in the window is spent
                                  -> backoff (revived: a fresh budget) after revive_after_s,
                                     or at once on SIGHUP

A run that was up and exited 0 (a node drained by SIGTERM: a rolling restart) is started again
at once and spends none of the budget, which is for crashes.

The supervisor (cluster/supervisor.py) moves every component along, one poll at a time.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from typing import IO, Any, Literal

from .child import Child, Component
from .launch_settings import LaunchSettings

State = Literal["starting", "up", "backoff", "given_up", "stopped"]


class Supervised:
    """A component, its current (or last) run, and the restarts it has had."""

    def __init__(
        self,
        component: Component,
        settings: LaunchSettings,
        sink: IO[str],
        lock: threading.Lock,
    ) -> None:
        self.component = component
        self.settings = settings
        self.sink = sink
        self.lock = lock
        self.child: Child | None = None
        self.state: State = "starting"
        self.restarts = 0
        self.recent: deque[float] = deque()  # when each restart of the window was scheduled
        self.last_exit: str | None = None
        self.restart_at = 0.0
        self.given_up_at = 0.0
        self.deadline = 0.0  # to be healthy by
        self.was_up = False  # whether the current (or last) run became healthy

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def running(self) -> bool:
        """Whether a run of it is (meant to be) alive: its group is one to signal."""
        return self.child is not None and self.state in ("starting", "up")

    def start(self, deadline: float) -> None:
        if self.restarts and self.sink not in (sys.stderr, sys.stdout):  # where a new run begins
            with self.lock:
                self.sink.write(f"--- pdserve launch: restart {self.restarts} ---\n")
        self.child = Child(self.component, self.sink, self.lock)
        self.state = "starting"
        self.deadline = deadline
        self.was_up = False

    def mark_up(self) -> None:
        self.state = "up"
        self.was_up = True

    def exited(self) -> bool:
        return self.running and self.child is not None and self.child.proc.poll() is not None

    def end_run(self, description: str | None = None) -> None:
        """The run is over: kill what is left of its group (a dead leader's scheduler process)
        and keep how it ended (`description`, else how its process exited)."""
        assert self.child is not None
        self.child.kill()
        self.last_exit = description or self.child.exit_description()

    def exit_code(self) -> int | None:
        """The last run's exit code (negative: killed by that signal); None while it runs."""
        return None if self.child is None else self.child.proc.returncode

    def drained(self) -> bool:
        """Whether the last run served and then exited 0 (drained): no crash to count."""
        return self.was_up and self.exit_code() == 0

    def schedule_restart(self, now: float) -> float | None:
        """Seconds until the next run, or None (given up) once the window's budget is spent;
        at once, and outside the budget, after a drained run (unless the budget is 0: never)."""
        if self.drained() and self.settings.restart_budget > 0:
            self.restarts += 1
            self.restart_at = now
            self.state = "backoff"
            return 0.0
        window = self.settings.restart_window_s
        while self.recent and now - self.recent[0] >= window:
            self.recent.popleft()
        if len(self.recent) >= self.settings.restart_budget:
            self.give_up(now)
            return None
        self.recent.append(now)
        self.restarts += 1
        delay = self.settings.backoff_s(len(self.recent))
        self.restart_at = now + delay
        self.state = "backoff"
        return delay

    def give_up(self, now: float) -> None:
        self.state = "given_up"
        self.given_up_at = now

    def revive_due(self, now: float) -> bool:
        """Whether it was given up on revive_after_s ago (never with revive_after_s 0)."""
        after = self.settings.revive_after_s
        return self.state == "given_up" and after > 0 and now - self.given_up_at >= after

    def revive(self, now: float) -> None:
        """Start it again at the next poll, with the whole restart budget to spend."""
        self.recent.clear()
        self.restarts += 1
        self.restart_at = now
        self.state = "backoff"

    def budget_line(self) -> str:
        """'restart 2 of 5 in 300s': the restart just scheduled, against the budget."""
        budget, window = self.settings.restart_budget, self.settings.restart_window_s
        return f"restart {len(self.recent)} of {budget} in {window:g}s"

    def spent_line(self) -> str:
        """Why it was given up on, for 'gave up on component NAME ...'."""
        if self.settings.restart_budget == 0:
            return "without a restart (launch.restart_budget is 0)"
        return f"after {len(self.recent)} restarts in {self.settings.restart_window_s:g}s"

    def stop(self) -> None:
        self.state = "stopped"

    def describe(self) -> dict[str, Any]:
        """Its entry in launch-state.json (the pid leads the run's process group)."""
        pid = self.child.proc.pid if self.running and self.child is not None else None
        return {
            "pid": pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }
