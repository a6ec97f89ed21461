"""The cluster a chaos run soaks, seen from outside: start and stop `pdserve launch`, read its
launch-state.json, and ask the gateway and the nodes what they hold (scripts/chaos.py).

Everything here reads what a tool may read from a running cluster (HTTP routes, the launcher's
state file, /proc), so the same run works against any config that `pdserve launch` starts.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cluster.config import load_cluster, resolve_config_path
from cluster.launch import health
from cluster.spec import GATEWAY

REPO = Path(__file__).resolve().parents[1]
READY_PREFIX = "pdserve cluster ready: "
LOG_TAIL_LINES = 40
HTTP_TIMEOUT_S = 5.0
REQUESTS_TOTAL = "pdserve_gateway_requests_total"
INFLIGHT = "pdserve_gateway_inflight_requests"
MIN_PACE_WINDOW_S = 3.0


class LaunchFailed(RuntimeError):
    """The launcher exited or was not ready in time; the message quotes the end of its log."""


@dataclass(frozen=True)
class Topology:
    """Where each component serves, from the same config and overrides the launcher gets."""

    config: Path  # the config file, absolute (the launcher runs in the repo root)
    gateway: str  # http://host:port
    nodes: dict[str, tuple[str, str]]  # name -> (role, http://host:port)

    def names_of(self, role: str) -> list[str]:
        return [name for name, (r, _) in self.nodes.items() if r == role]


def topology(config: str, overrides: Sequence[str]) -> Topology:
    path = resolve_config_path(config).resolve()
    cluster = load_cluster(path, list(overrides))

    def url(name: str) -> str:
        return health(cluster, name).removesuffix("/health")  # the launcher's own address rule

    nodes = {n: (cluster.role_of(n), url(n)) for n in cluster.component_names() if n != GATEWAY}
    return Topology(path, url(GATEWAY), nodes)


# ---- the launcher ----------------------------------------------------------------------------


def start_launcher(config: Path, overrides: Sequence[str], log_dir: Path) -> subprocess.Popen:
    """`pdserve launch` of this checkout (cwd: the repo root, so `-m` finds its packages), in a
    session of its own: a Ctrl-C here reaches only this script, which stops it in order."""
    sets = [arg for text in overrides for arg in ("--set", text)]
    argv = [sys.executable, "-m", "cluster.cli", "launch", str(config), "--log-dir", str(log_dir)]
    log = open(log_dir / "launcher.log", "ab")  # noqa: SIM115 (the child keeps it)
    with log:
        return subprocess.Popen(
            [*argv, *sets],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def wait_ready(launcher: subprocess.Popen, log_dir: Path, timeout_s: float) -> str:
    """The gateway's base URL from the launcher's ready line; LaunchFailed otherwise."""
    deadline = time.monotonic() + timeout_s
    log = log_dir / "launcher.log"
    while time.monotonic() < deadline:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].strip().removesuffix("/v1")
        if launcher.poll() is not None:
            why = f"pdserve launch exited with {launcher.returncode} before it was ready"
            raise LaunchFailed(f"{why}; {log} ends with:\n{tail(log)}")
        time.sleep(0.5)
    raise LaunchFailed(
        f"pdserve launch not ready within {timeout_s:g}s; {log} ends with:\n{tail(log)}"
    )


def stop_launcher(launcher: subprocess.Popen, timeout_s: float) -> int | None:
    """SIGTERM (it stops every component in order), then SIGKILL to its group after
    `timeout_s`; its exit code, None when it had to be killed."""
    if launcher.poll() is not None:
        return launcher.returncode
    launcher.send_signal(signal.SIGTERM)
    try:
        return launcher.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        return None


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        return f"    (cannot read {path}: {exc})"
    return "\n".join(f"    {line}" for line in text[-lines:]) or "    (empty)"


def launch_state(log_dir: Path) -> dict[str, dict[str, Any]]:
    """launch-state.json's components ({} before the launcher wrote it)."""
    try:
        return json.loads((log_dir / "launch-state.json").read_text())["components"]
    except (OSError, ValueError, KeyError):
        return {}


# ---- memory ----------------------------------------------------------------------------------


def group_rss_kib(pgid: int) -> int:
    """VmRSS summed over every process in process group `pgid` (0 when none is left)."""
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and process_group(entry.name) == pgid:
            total += vm_rss_kib(entry.name)
    return total


def process_group(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # NOTE: comm (field 2) may hold spaces and parentheses; the fields after its last ")" are
    # state, ppid, pgrp, ...
    return int(stat.rpartition(")")[2].split()[2])


def vm_rss_kib(pid: str) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), 0)


def rss_sample(log_dir: Path) -> dict[str, dict[str, int | None]]:
    """Per component: its RSS (KiB, its whole group) and its restart count when sampled, so that
    growth is only compared within one run of a component."""
    sample: dict[str, dict[str, int | None]] = {}
    for name, entry in launch_state(log_dir).items():
        pid = entry.get("pid")
        rss = group_rss_kib(pid) if pid else None
        sample[name] = {"rss_kib": rss, "restarts": entry.get("restarts", 0)}
    return sample


def rss_report(first: dict[str, dict], last: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """RSS after warm-up and at the end per component; growth only for one that was not
    restarted in between (a restarted component's RSS starts again from a fresh process)."""
    report = {}
    for name, end in last.items():
        start = first.get(name, {})
        same_run = start.get("restarts") == end["restarts"]
        before, after = start.get("rss_kib"), end["rss_kib"]
        growth = None
        if same_run and before and after is not None:
            growth = round(100.0 * (after - before) / before, 1)
        report[name] = {
            "warm_kib": before,
            "end_kib": after,
            "growth_pct": growth,
            "restarted_since_warm": not same_run,
        }
    return report


# ---- HTTP ------------------------------------------------------------------------------------


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=HTTP_TIMEOUT_S, trust_env=False)


def prometheus_values(text: str) -> dict[str, float]:
    """`name{labels}` -> value for each sample line of a Prometheus text exposition."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def gateway_metrics(gateway: str) -> dict[str, float]:
    return prometheus_values(get(f"{gateway}/metrics").text)


def healthy_at_gateway(metrics: dict[str, float], role: str, url: str) -> bool:
    key = f'pdserve_gateway_instance_healthy{{role="{role}",url="{url}"}}'
    return metrics.get(key) == 1.0


def wait_until(check: Callable[[], bool], timeout_s: float, poll_s: float = 0.5) -> bool:
    """Whether `check()` came true within `timeout_s` (an HTTP error counts as not yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def cluster_idle(top: Topology) -> bool:
    """No request in flight at the gateway, and none running, waiting or held on any node."""
    if gateway_metrics(top.gateway).get(INFLIGHT, 1) != 0:
        return False
    for _, url in top.nodes.values():
        info = get(f"{url}/get_server_info").json()
        if info["running"] or info["waiting"] or info["held"]:
            return False
    return True


def node_pages(top: Topology) -> dict[str, dict[str, Any]]:
    """Per node: pages not free (held by a request, or lost) and its integrity check."""
    report = {}
    for name, (_, url) in top.nodes.items():
        try:
            info = get(f"{url}/get_server_info").json()
            check = get(f"{url}/check_integrity")
        except httpx.HTTPError as exc:
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        integrity = check.json() if check.status_code in (200, 500) else {"ok": None}
        report[name] = {
            "not_free": info["total_pages"] - info["free_pages"],
            "held_requests": info["held"],
            "integrity": True if integrity.get("ok") else integrity.get("error", check.text),
        }
    return report


class GatewayMeter:
    """The gateway's pace while loaded (requests answered per second of the last `window_s`
    in which it had requests in flight) and its in-flight count, sampled at most once per
    `every_s`: what sizes the bench rounds, and how steady the load was."""

    def __init__(self, gateway: str, window_s: float = 30.0, every_s: float = 1.0) -> None:
        self.gateway = gateway
        self.window_s = window_s
        self.every_s = every_s
        self.samples: list[tuple[float, float, float]] = []  # (time, answered, in flight)

    def sample(self) -> None:
        now = time.monotonic()
        if self.samples and now - self.samples[-1][0] < self.every_s:
            return
        try:
            metrics = gateway_metrics(self.gateway)
        except httpx.HTTPError:
            return
        answered = sum(v for k, v in metrics.items() if k.startswith(REQUESTS_TOTAL))
        self.samples.append((now, answered, metrics.get(INFLIGHT, 0.0)))

    def pace(self) -> float | None:
        """Requests/s while busy; None before a few busy seconds were seen. NOTE: idle time
        (bench still loading its tokenizer) is left out, or the pace would be too low."""
        if not self.samples:
            return None
        since = self.samples[-1][0] - self.window_s
        recent = [s for s in self.samples if s[0] >= since]
        busy_s = answered = 0.0
        for (t0, a0, f0), (t1, a1, f1) in itertools.pairwise(recent):
            if f0 or f1:
                busy_s, answered = busy_s + t1 - t0, answered + a1 - a0
        if busy_s < MIN_PACE_WINDOW_S or not answered:
            return None
        return answered / busy_s

    def inflight_summary(self, since: float = 0.0) -> dict[str, float]:
        """Requests in flight at the gateway over the samples from `since` on."""
        inflight = [s[2] for s in self.samples if s[0] >= since]
        if not inflight:
            return {}
        return {
            "mean": round(sum(inflight) / len(inflight), 1),
            "max": max(inflight),
            "idle_share": round(sum(1 for f in inflight if not f) / len(inflight), 2),
        }
