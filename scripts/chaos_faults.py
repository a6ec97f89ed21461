"""Faults a chaos run injects into a launched cluster's nodes, one at a time (scripts/chaos.py).

At seeded random intervals a thread picks a node that is up and whose role keeps another node
that is up (by the launcher's launch-state.json) and healthy (by the gateway's own view), so the
cluster can always serve, and does one of:

- kill: SIGKILL to its process group (its HTTP and scheduler processes die at once);
- stop: SIGSTOP to its group, 5-10 s, SIGCONT (a node that hangs, then comes back);
- term: SIGTERM to its group (the node drains, or today simply stops, and exits).

The launcher restarts what exits. Every group this stops is resumed on the way out, whatever
ends the run (`stop()`, then `resume_all()` in a `finally`).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from chaos_cluster import Topology, gateway_metrics, healthy_at_gateway, launch_state

KINDS = ("kill", "stop", "term")


class FaultInjector:
    """One thread that injects faults until `stop()`; `record` lists them for the report."""

    def __init__(
        self,
        top: Topology,
        log_dir: Path,
        seed: int,
        interval_s: tuple[float, float] = (15.0, 40.0),
        pause_s: tuple[float, float] = (5.0, 10.0),
    ) -> None:
        self.top = top
        self.log_dir = log_dir
        self.rng = random.Random(seed)
        self.interval_s = interval_s
        self.pause_s = pause_s
        self.started = time.monotonic()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.stopped: set[int] = set()  # process groups we SIGSTOPped and not yet resumed
        self.record: list[dict[str, Any]] = []
        self.skipped = 0  # turns with no node that could be faulted safely
        self.thread = threading.Thread(target=self.run, name="chaos-faults", daemon=True)

    def start(self, began: float) -> None:
        """Inject from now on; the record's times count from `began` (the first request)."""
        self.started = began
        self.thread.start()

    def stop(self) -> None:
        """No new fault; a pause in progress ends now (its group is resumed)."""
        self.done.set()
        if self.thread.ident is not None:  # started
            self.thread.join(timeout=5.0)
        self.resume_all()

    def counts(self) -> dict[str, int]:
        by_kind = Counter(f["kind"] for f in self.record)
        return {kind: by_kind[kind] for kind in KINDS}

    def run(self) -> None:
        while not self.done.wait(self.rng.uniform(*self.interval_s)):
            try:
                self.inject_one()
            except (OSError, httpx.HTTPError) as exc:  # NOTE: a lost turn, not a lost run
                self.say(f"fault turn failed: {type(exc).__name__}: {exc}")

    def inject_one(self) -> None:
        victim = self.pick()
        if victim is None:
            self.skipped += 1
            self.say("no node can be faulted now (each role needs another node up); skipped")
            return
        name, pgid = victim
        kind = self.rng.choice(KINDS)
        pause = self.rng.uniform(*self.pause_s) if kind == "stop" else None
        at = round(time.monotonic() - self.started, 1)
        self.record.append({"t_s": at, "kind": kind, "node": name, "pgid": pgid})
        self.say(
            f"fault={kind} node={name} pgid={pgid}" + (f" pause={pause:.1f}s" if pause else "")
        )
        try:
            if kind == "stop":
                self.pause(pgid, pause or 0.0)
            else:
                os.killpg(pgid, signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        except ProcessLookupError:
            self.say(f"node={name} pgid={pgid} was already gone")

    def pick(self) -> tuple[str, int] | None:
        """A random node that is up, whose role keeps another node up and healthy; or None."""
        state = launch_state(self.log_dir)
        metrics = gateway_metrics(self.top.gateway)
        serving = {
            name
            for name, (role, url) in self.top.nodes.items()
            if state.get(name, {}).get("state") == "up" and healthy_at_gateway(metrics, role, url)
        }
        candidates = []
        for name, (role, _) in self.top.nodes.items():
            entry = state.get(name, {})
            others = set(self.top.names_of(role)) - {name}
            if entry.get("state") == "up" and entry.get("pid") and others & serving:
                candidates.append((name, int(entry["pid"])))
        return self.rng.choice(candidates) if candidates else None

    def pause(self, pgid: int, seconds: float) -> None:
        with self.lock:
            self.stopped.add(pgid)  # NOTE: before the signal, so no path can miss resuming it
            os.killpg(pgid, signal.SIGSTOP)
        self.done.wait(seconds)
        self.resume(pgid)
        self.say(f"resumed pgid={pgid}")

    def resume(self, pgid: int) -> None:
        with self.lock:
            self.stopped.discard(pgid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)

    def resume_all(self) -> None:
        for pgid in list(self.stopped):
            self.resume(pgid)
            self.say(f"resumed pgid={pgid} on the way out")

    def say(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(f"chaos {stamp}: {line}", file=sys.stderr, flush=True)
