"""`pdserve status` and `pdserve revive`: a running `pdserve launch`, seen through its log dir.

Both read DIR/launch-state.json (the launcher keeps it current) and check that the launcher that
wrote it still runs (its pid and start time: a reused pid is not it).

- `pdserve status --log-dir DIR [--json]`: each component's state, pid, restarts and last exit,
  and what its /health answers now; exit 0 when every component is up and healthy.
- `pdserve revive --log-dir DIR`: start again, now, what the launcher gave up on (it does so
  by itself `launch.revive_after_s` after giving up; this is for a cause fixed sooner: a disk
  freed, a GPU back). It sends the launcher SIGHUP and waits until they are no longer given up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from .child import health_error, process_start
from .supervisor import STATE_FILE

POLL_S = 0.1


def add_running(sub: argparse._SubParsersAction) -> None:
    """The `status` and `revive` subcommands."""
    p = sub.add_parser("status", help="where each component of a running `pdserve launch` stands")
    add_log_dir(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.set_defaults(func=run_status)
    p = sub.add_parser("revive", help="start again the components `pdserve launch` gave up on")
    add_log_dir(p)
    p.add_argument(
        "--timeout", type=float, default=10.0,
        help="seconds to wait for the launcher to start them (0: send the signal and return)",
    )  # fmt: skip
    p.set_defaults(func=run_revive)


def add_log_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-dir", type=Path, required=True, help="the --log-dir of the running `pdserve launch`"
    )


def run_status(args: argparse.Namespace) -> int:
    """0 when the launcher runs and every component is up and healthy, else 1."""
    state = read_state(args.log_dir)
    running = launcher_runs(state)
    urls = state.get("health_urls", {})
    rows = {}
    for name, component in state["components"].items():
        url, live = urls.get(name), component["state"] in ("starting", "up")
        health = (health_error(url) or "healthy") if running and live and url else "-"
        rows[name] = {**component, "health": health}
    launcher = {**state["launcher"], "running": running}
    if args.json:
        print(json.dumps({"launcher": launcher, "components": rows}, indent=2))
    else:
        print(status_table(launcher, rows))
    healthy = all(r["state"] == "up" and r["health"] == "healthy" for r in rows.values())
    return 0 if running and healthy else 1


def status_table(launcher: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(launcher["written"]))
    alive = "running" if launcher["running"] else "NOT running (this state is stale)"
    lines = [f"launcher pid {launcher['pid']}: {alive}; state written {written}"]
    header = ("component", "state", "pid", "restarts", "health", "last exit")
    table = [header] + [
        (name, r["state"], str(r["pid"] or "-"), str(r["restarts"]), r["health"],
         r["last_exit"] or "-")
        for name, r in rows.items()
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def run_revive(args: argparse.Namespace) -> int:
    """0 once every component given up on is starting again (or none was); 1 when no launcher
    runs there or it did not act in time."""
    state = read_state(args.log_dir)
    pid = int(state["launcher"]["pid"])
    if not launcher_runs(state):
        print(
            f"pdserve revive: no `pdserve launch` runs with pid {pid}, the launcher that wrote "
            f"{args.log_dir / STATE_FILE} (it was stopped or killed); start the cluster again"
        )
        return 1
    given_up = given_up_in(state)
    if not given_up:
        print(f"pdserve revive: the launcher (pid {pid}) has given up on no component")
        return 0
    os.kill(pid, signal.SIGHUP)
    names = ", ".join(given_up)
    if args.timeout <= 0:
        print(f"pdserve revive: asked the launcher (pid {pid}) to start {names} again")
        return 0
    deadline = time.monotonic() + args.timeout
    while set(given_up) & set(given_up_in(read_state(args.log_dir))):
        if time.monotonic() >= deadline:
            print(f"pdserve revive: the launcher (pid {pid}) did not start {names} again within "
                  f"{args.timeout:g}s")  # fmt: skip
            return 1
        time.sleep(POLL_S)
    print(f"pdserve revive: starting {names} again (`pdserve status` shows when they are up)")
    return 0


def read_state(log_dir: Path) -> dict[str, Any]:
    path = log_dir / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no {path}: give the --log-dir that `pdserve launch` was started with (without "
            "one, the launcher keeps no state; send SIGHUP to its pid yourself to revive)"
        )
    return json.loads(path.read_text())


def launcher_runs(state: dict[str, Any]) -> bool:
    """Whether the launcher that wrote `state` still runs (the same process, not its pid
    reused)."""
    start = state["launcher"].get("start")
    return start is not None and process_start(int(state["launcher"]["pid"])) == start


def given_up_in(state: dict[str, Any]) -> list[str]:
    return [name for name, c in state["components"].items() if c["state"] == "given_up"]
