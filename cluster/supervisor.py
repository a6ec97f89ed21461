"""Child processes run as one cluster: start in stages, restart what dies, stop in order.

Components start stage by stage (the gateway once the nodes are healthy). One that crashes is
restarted with the same command after a backoff that doubles, while the others keep serving,
until it spends its budget of restarts in a window (cluster/launch_settings.py); then it stays
down for `revive_after_s` (or until a SIGHUP to the supervisor), and is then started again with
a fresh budget, unless nothing could serve without it (no gateway, no decode node, or no prefill node
of a PD cluster: cluster/launch.py sets these groups): then the supervisor
stops everything and fails, naming it and quoting the end of its log. One that served and exited
0 (a node drained by SIGTERM) is restarted at once, outside the budget. At start, a component
whose first run exits with code 2 (a usage or config error, which a restart would only repeat)
or that is not healthy within the health timeout fails the launch; after it, a restarted one
that is not healthy in time counts as one more exit.

Only a SIGINT or SIGTERM to the supervisor stops the cluster, highest stage first: SIGTERM to the
gateway and up to the grace period for it to finish its open streams, then the same for the
nodes (which drain), then SIGKILL to whatever is left of every group. With a log dir,
`launch-state.json` there says where each component stands, for tools (a pid is also the
component's process group id).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO

from .child import Child, Component, health_error, process_start
from .launch_settings import LaunchSettings
from .supervised import Supervised

POLL_S = 0.1
STATE_FILE = "launch-state.json"
USAGE_ERROR = 2  # the exit code of argparse's usage errors, and of `pdserve`'s config errors


class ComponentFailed(RuntimeError):
    """The cluster cannot go on: a component failed at start (a usage or config error, or not
    healthy in time), or was given up on and nothing can serve without it."""

    def __init__(self, message: str, child: Child | None, errors_only: bool = False) -> None:
        super().__init__(message)
        self.child = child
        self.errors_only = errors_only  # quote only its error message, not its whole log's end


class StopRequested(Exception):
    """SIGINT or SIGTERM reached the supervisor."""


class Supervisor:
    """Runs components as one cluster; `run` is the whole life cycle."""

    def __init__(
        self,
        components: list[Component],
        settings: LaunchSettings | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.settings = settings or LaunchSettings()
        self.log_dir = log_dir
        self.lock = threading.Lock()
        self.sinks: list[IO[str]] = []
        self.members = [
            Supervised(c, self.settings, self.sink_for(c), self.lock) for c in components
        ]
        self.active: list[Supervised] = []  # the members of every stage started so far
        self.start_deadline = 0.0
        self.ready = False
        self.signal_received: int | None = None
        self.revive_requested = False  # SIGHUP: start every component given up on again
        self.stopped = False

    def run(self, ready_message: str) -> int:
        """Start all, wait for health, print `ready_message`, supervise; 0 after a requested
        stop, 1 when the cluster could not start or can no longer serve."""
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.on_hangup)
        try:
            self.write_state()
            self.start_stages()
            self.ready = True
            print(ready_message, flush=True)
            self.watch()
        except StopRequested:
            return 0
        except ComponentFailed as exc:
            self.stop_all()  # first: then its pipe is closed and its log complete
            tail = exc.child.log_tail(exc.errors_only) if exc.child else "    (no output)"
            self.say(f"{exc}; its log ends with:\n{tail}")
            return 1
        finally:
            self.stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0

    def on_signal(self, signum: int, frame: object) -> None:
        self.signal_received = signum  # NOTE: only a flag; the loops act on it between polls

    def on_hangup(self, signum: int, frame: object) -> None:
        self.revive_requested = True  # NOTE: as on_signal, acted on at the next poll

    def check_stop(self) -> None:
        if self.signal_received is not None:
            raise StopRequested

    def say(self, line: str) -> None:
        """One line about an event, on stderr (beside the components' prefixed lines)."""
        with self.lock:
            print(f"pdserve launch: {line}", file=sys.stderr, flush=True)

    def sink_for(self, component: Component) -> IO[str]:
        if self.log_dir is None:
            return sys.stderr
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sink = open(self.log_dir / f"{component.name}.log", "a", encoding="utf-8")  # noqa: SIM115
        self.sinks.append(sink)
        return sink

    def start_stages(self) -> None:
        """Start every component, stage by stage, each stage once the one before is settled
        (healthy, or given up on)."""
        self.start_deadline = time.monotonic() + self.settings.health_timeout_s
        for stage in sorted({m.component.stage for m in self.members}):
            started = [m for m in self.members if m.component.stage == stage]
            for member in started:
                self.check_stop()
                member.start(self.start_deadline)
                self.active.append(member)
            self.write_state()
            while True:
                self.check_stop()
                self.poll()
                if all(m.state in ("up", "given_up") for m in started):
                    break
                time.sleep(POLL_S)

    def watch(self) -> None:
        """Return never: raise StopRequested on a signal, ComponentFailed when nothing can
        serve any more."""
        while True:
            self.check_stop()
            self.poll()
            time.sleep(POLL_S)

    def poll(self) -> None:
        """One look at every started component: exits, health, restarts that are due."""
        now = time.monotonic()
        self.revive(now)
        for member in self.active:
            if member.exited():
                assert member.child is not None
                self.on_exit(member, member.child.exit_description())
            elif member.state == "starting":
                self.check_health(member, now)
            elif member.state == "backoff" and now >= member.restart_at:
                timeout = self.settings.health_timeout_s
                member.start(now + timeout if self.ready else self.start_deadline)
                self.write_state()

    def revive(self, now: float) -> None:
        """Give each component given up on a fresh restart budget and start it at the next
        look: all of them after a SIGHUP, else those given up on revive_after_s ago."""
        requested, self.revive_requested = self.revive_requested, False
        given_up = [m for m in self.active if m.state == "given_up"]
        if requested and not given_up:
            self.say("SIGHUP: no component is given up on, so there is nothing to start again")
        after = self.settings.revive_after_s
        why = "on SIGHUP" if requested else f"{after:g}s after giving up on it"
        revived = [m for m in given_up if requested or m.revive_due(now)]
        for member in revived:
            member.revive(now)
            self.say(f"starting component {member.name!r} again {why}, with a fresh budget")
        if revived:
            self.write_state()

    def check_health(self, member: Supervised, now: float) -> None:
        url = member.component.health_url
        error = health_error(url) if url else None
        if error is None:
            member.mark_up()
            self.write_state()
            if member.restarts:
                self.say(f"component {member.name!r} is healthy again")
            return
        if now <= member.deadline:
            return
        timeout = self.settings.health_timeout_s
        late = f"did not become healthy at {url} within {timeout:g}s (last check: {error})"
        if not self.ready:
            raise ComponentFailed(f"component {member.name!r} {late}", member.child)
        self.on_exit(member, late)

    def on_exit(self, member: Supervised, description: str) -> None:
        """A run ended (or was ended): restart it (at once after a drain, else after the
        backoff), or give up on it; a usage or config error at start fails the launch."""
        first_run = member.restarts == 0 and not member.was_up
        member.end_run(description)
        if first_run and member.exit_code() == USAGE_ERROR:
            member.give_up(time.monotonic())
            raise ComponentFailed(
                f"component {member.name!r} {description} at start, a usage or config error "
                "that a restart would repeat, so the launcher stopped the cluster",
                member.child,
                errors_only=True,
            )
        delay = member.schedule_restart(time.monotonic())
        self.write_state()
        if delay is not None:
            restart = f"restarting it in {delay:g}s ({member.budget_line()})"
            if member.drained():
                restart = "restarting it now (a clean exit: not counted against the restart budget)"
            self.say(f"component {member.name!r} {description}; {restart}")
            return
        gave_up = f"gave up on component {member.name!r} {member.spent_line()}"
        gave_up += f"; its last run {description}"
        group = self.unserved_group()
        if group is not None:
            raise ComponentFailed(
                f"{gave_up}; with no {group} component left nothing can serve, so the "
                "launcher stopped the cluster",
                member.child,
            )
        assert member.child is not None
        self.say(f"{gave_up}; its log ends with:\n{member.child.log_tail()}")

    def unserved_group(self) -> str | None:
        """A needed group whose every component has been given up on, if there is one."""
        groups = sorted({m.component.needed_group for m in self.members} - {None})
        for group in groups:
            members = [m for m in self.members if m.component.needed_group == group]
            if all(m.state == "given_up" for m in members):
                return group
        return None

    def stop_all(self) -> None:
        """Stage by stage, last first: SIGTERM, up to the grace period for those groups to
        exit; then SIGKILL to what is left of every group."""
        if self.stopped:
            return
        self.stopped = True
        running = [m for m in self.active if m.running]
        for stage in sorted({m.component.stage for m in running}, reverse=True):
            self.terminate([m.child for m in running if m.component.stage == stage and m.child])
        for member in running:
            member.end_run()  # its last exit is now this stop's (drained, or killed)
        for member in self.active:
            if member.child is not None:
                member.child.pump.join(timeout=1.0)
        for member in self.members:
            if member.state != "given_up":
                member.stop()
        self.write_state()
        for sink in self.sinks:
            sink.close()

    def terminate(self, children: list[Child]) -> None:
        """SIGTERM to each group, then wait up to the grace period for all of them to exit."""
        for child in children:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_s
        while any(c.group_alive() for c in children) and time.monotonic() < deadline:
            time.sleep(POLL_S / 2)

    def write_state(self) -> None:
        """`launch-state.json` in the log dir, replaced whole (readers never see half of it)."""
        if self.log_dir is None:
            return
        # NOTE: the launcher's pid (and its start, for a reused pid) says whether the file is
        # current: a launcher killed with SIGKILL leaves its last word here, components "up"
        # with pids long gone
        pid = os.getpid()
        launcher = {"pid": pid, "start": process_start(pid), "written": round(time.time(), 3)}
        state = {
            "launcher": launcher,
            "components": {m.name: m.describe() for m in self.members},
            "health_urls": {m.name: m.component.health_url for m in self.members},
        }
        path = self.log_dir / STATE_FILE
        temporary = path.with_name(f".{STATE_FILE}.tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
