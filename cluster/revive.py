"""`pdserve revive --log-dir DIR`: start again, now, what a running `pdserve launch` gave up on.

The launcher does it by itself `launch.revive_after_s` after giving up on a component; this asks
for it at once (the cause is fixed: a disk freed, a GPU back). It reads the launcher's pid from
DIR/launch-state.json, sends it SIGHUP, and waits until those components are no longer given up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from .child import process_start
from .supervisor import STATE_FILE

POLL_S = 0.1


def add_revive(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("revive", help="start again the components `pdserve launch` gave up on")
    p.add_argument(
        "--log-dir", type=Path, required=True, help="the --log-dir of the running `pdserve launch`"
    )
    p.add_argument(
        "--timeout", type=float, default=10.0,
        help="seconds to wait for the launcher to start them (0: send the signal and return)",
    )  # fmt: skip
    p.set_defaults(func=run_revive)


def run_revive(args: argparse.Namespace) -> int:
    """0 once every component given up on is starting again (or none was); 1 when no launcher
    runs there or it did not act in time."""
    state = read_state(args.log_dir)
    pid = int(state["launcher"]["pid"])
    start = state["launcher"].get("start")
    if start is None or process_start(pid) != start:
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
    print(f"pdserve revive: starting {names} again (its health: see `pdserve launch`'s output)")
    return 0


def read_state(log_dir: Path) -> dict[str, Any]:
    path = log_dir / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no {path}: give the --log-dir that `pdserve launch` was started with (without "
            "one, send SIGHUP to the launcher's pid yourself)"
        )
    return json.loads(path.read_text())


def given_up_in(state: dict[str, Any]) -> list[str]:
    return [name for name, c in state["components"].items() if c["state"] == "given_up"]
