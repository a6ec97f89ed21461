"""The launcher's supervision with real child processes: restarts, giving up, ordered stops,
health waits, the state file.

Stand-in components are small real servers (Python's http.server, each starting a grandchild
process the way a node starts its scheduler process), so the process-tree handling is what runs
under `pdserve launch`. Backoffs are tiny here (RESTARTS), so a restart takes a moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.child import group_has_live_member
from cluster.cli import main as pdserve_main
from cluster.config import DEFAULT_CONFIG, load_cluster
from cluster.launch import check_can_listen, cluster_components, dry_run, with_flags
from cluster.launch_settings import LaunchSettings
from cluster.schema import ConfigError
from tests.ports import free_port, free_ports

REPO = Path(__file__).resolve().parents[2]

# A component: serves `directory` on `port` (GET /health answers 200 when the directory holds a
# `health` file), after starting a grandchild; writes "own_pid grandchild_pid" to `pidfile`.
# on_term: "default" dies, "ignore" ignores SIGTERM, "record" appends "term T" to PIDFILE.term,
# takes a moment (an open stream finishing), appends "exit T" and exits 0 (T: time.monotonic()),
# as a node exits once drained; "exit2" exits with code 2.
COMPONENT = """
import functools, http.server, os, signal, subprocess, sys, time
port, directory, pidfile, on_term = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

def record(signum, frame):
    with open(pidfile + ".term", "a") as f:
        f.write(f"term {time.monotonic()}\\n")
    time.sleep(0.3)
    with open(pidfile + ".term", "a") as f:
        f.write(f"exit {time.monotonic()}\\n")
    os._exit(0)

if on_term == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
if on_term == "record":
    signal.signal(signal.SIGTERM, record)
if on_term == "exit2":
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(2))
with open(pidfile + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.rename(pidfile + ".tmp", pidfile)
print(f"serving on {port}", flush=True)
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()
"""
CRASH = "print('bad option: --frobnicate'); raise SystemExit(3)"
# what argparse does with a flag it does not know (and `pdserve` with a bad setting): exit 2
USAGE_ERROR = (
    "print('usage: pdserve prefill [-h] [--config CONFIG]'); "
    "print('pdserve prefill: error: unrecognized arguments: --frobnicate'); raise SystemExit(2)"
)

SUPERVISE = """
import json, sys
from pathlib import Path
from cluster.child import Component
from cluster.launch_settings import LaunchSettings
from cluster.supervisor import Supervisor
spec = json.loads(sys.argv[1])
components = [Component(**{**c, "argv": tuple(c["argv"])}) for c in spec["components"]]
log_dir = Path(spec["log_dir"]) if spec["log_dir"] else None
supervisor = Supervisor(components, LaunchSettings(**spec["settings"]), log_dir)
sys.exit(supervisor.run("READY"))
"""
# Restarts at once, as far as a test can tell; the budget and window are the defaults.
RESTARTS = {"restart_backoff_s": 0.05, "restart_backoff_max_s": 0.2}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_until(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.02)
    return check()


def serves(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class StandIn:
    name: str
    port: int
    pidfile: Path

    def pids(self) -> list[int]:
        assert wait_until(self.pidfile.exists), f"{self.name} never wrote {self.pidfile}"
        return [int(p) for p in self.pidfile.read_text().split()]

    def stop_record(self) -> dict[str, float]:
        """{"term": when SIGTERM came, "exit": when it was done} (on_term="record")."""
        path = Path(f"{self.pidfile}.term")
        assert path.exists(), f"{self.name} never got SIGTERM"
        return {k: float(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def needed_group(name: str) -> str | None:
    """As the launcher sets it where no decode node prefills itself: every role is needed."""
    return next((g for g in ("gateway", "decode", "prefill") if name.startswith(g)), None)


class Run:
    """A supervisor process (the code `pdserve launch` runs) over stand-in components."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.components: list[dict[str, Any]] = []
        self.stand_ins: list[StandIn] = []
        self.ready = threading.Event()
        self.stdout: list[str] = []
        self.log_dir: Path | None = None

    def add(
        self,
        name: str,
        healthy: bool = True,
        on_term: str = "default",
        stage: int = 0,
        needed: bool = True,
    ) -> StandIn:
        port, site = free_port(), self.tmp / f"site-{name}"
        site.mkdir()
        if healthy:
            (site / "health").write_text("ok")
        stand_in = StandIn(name, port, self.tmp / f"{name}.pids")
        argv = [sys.executable, "-c", COMPONENT, str(port), str(site), str(stand_in.pidfile)]
        self.add_command(name, [*argv, on_term], port, stage, needed)
        self.stand_ins.append(stand_in)
        return stand_in

    def add_command(
        self, name: str, argv: list[str], port: int | None, stage: int = 0, needed: bool = True
    ) -> None:
        """`needed`: False for a prefill node beside a decode node that prefills itself."""
        url = f"http://127.0.0.1:{port}/health" if port else None
        self.components.append(
            {
                "name": name,
                "argv": argv,
                "health_url": url,
                "stage": stage,
                "needed_group": needed_group(name) if needed else None,
            }
        )

    def start(
        self, timeout_s: float = 20.0, grace_s: float = 5.0, log_dir: Path | None = None, **settings
    ):
        self.log_dir = log_dir
        spec = {
            "components": self.components,
            "settings": {
                **RESTARTS,
                "health_timeout_s": timeout_s,
                "grace_s": grace_s,
                **settings,
            },
            "log_dir": str(log_dir) if log_dir else None,
        }
        self.stderr_path = self.tmp / "supervisor.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SUPERVISE, json.dumps(spec)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.stderr_path.open("w"),
            text=True,
        )
        threading.Thread(target=self.read_stdout, daemon=True).start()
        return self

    def read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            if line.strip() == "READY":
                self.ready.set()

    def wait_ready(self) -> None:
        assert self.ready.wait(30), f"not ready; stderr:\n{self.stderr()}"

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def state(self) -> dict[str, dict[str, Any]]:
        """launch-state.json's components."""
        assert self.log_dir is not None
        return json.loads((self.log_dir / "launch-state.json").read_text())["components"]

    def all_pids(self) -> list[int]:
        return [pid for s in self.stand_ins for pid in s.pids()]

    def written_pids(self) -> list[int]:
        """The pids of the stand-ins that got as far as writing them (the supervisor may stop
        one before it does)."""
        return [pid for s in self.stand_ins if s.pidfile.exists() for pid in s.pids()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_every_process_tree(run: Run, signum: int) -> None:
    run.add("prefill-0")
    run.add("decode-0")
    run.add("gateway", stage=1)
    run.start()
    run.wait_ready()
    pids = run.all_pids()
    assert len(pids) == 6 and all(alive(pid) for pid in pids)
    run.proc.send_signal(signum)
    assert run.wait_exit() == 0
    assert wait_until(lambda: not any(alive(pid) for pid in pids)), "orphans left behind"
    assert "[decode-0] serving on" in run.stderr()  # logs: prefixed, on stderr


def test_stubborn_component_is_killed_after_the_grace_period(run: Run) -> None:
    stubborn = run.add("stubborn", on_term="ignore")
    run.start(grace_s=0.5)
    run.wait_ready()
    pids = stubborn.pids()
    started = time.monotonic()
    run.proc.terminate()
    assert run.wait_exit() == 0
    assert time.monotonic() - started < 10
    assert wait_until(lambda: not any(alive(pid) for pid in pids))


def test_stop_waits_for_the_gateway_before_it_stops_the_nodes(run: Run) -> None:
    nodes = [run.add("prefill-0", on_term="record"), run.add("decode-0", on_term="record")]
    gateway = run.add("gateway", on_term="record", stage=1)
    run.start()
    run.wait_ready()
    run.proc.terminate()
    assert run.wait_exit() == 0
    first = gateway.stop_record()
    for node in nodes:  # NOTE: the order of events, from one clock: no durations asserted
        assert node.stop_record()["term"] > first["exit"] > first["term"]


def test_a_killed_component_restarts_while_the_others_serve(run: Run, tmp_path: Path) -> None:
    others = [run.add("prefill-0"), run.add("decode-0")]
    victim = run.add("decode-1")
    others.append(run.add("gateway", stage=1))
    run.start(log_dir=tmp_path / "logs")
    run.wait_ready()
    before = {s.name: s.pids() for s in run.stand_ins}
    state = run.state()
    for stand_in in run.stand_ins:  # each component leads its own process group
        pid = state[stand_in.name]["pid"]
        assert (pid, os.getpgid(pid)) == (before[stand_in.name][0], pid)
        assert state[stand_in.name] == {
            "pid": pid,
            "state": "up",
            "restarts": 0,
            "last_exit": None,
        }

    os.killpg(before["decode-1"][0], signal.SIGKILL)
    restarted = {"state": "up", "restarts": 1}
    assert wait_until(lambda: restarted.items() <= run.state()["decode-1"].items())
    after = victim.pids()
    assert after[0] != before["decode-1"][0] and serves(victim.port)
    assert not any(alive(pid) for pid in before["decode-1"])  # the old group went whole
    for stand_in in others:  # untouched, and serving all along
        assert stand_in.pids() == before[stand_in.name] and serves(stand_in.port)
    assert run.state()["decode-1"] == {
        "pid": after[0],
        "state": "up",
        "restarts": 1,
        "last_exit": "was killed by SIGKILL",
    }
    message = run.stderr()
    assert (
        "pdserve launch: component 'decode-1' was killed by SIGKILL; restarting it in 0.05s "
        "(restart 1 of 5 in 300s)"
    ) in message
    assert "pdserve launch: component 'decode-1' is healthy again" in message
    log = (tmp_path / "logs" / "decode-1.log").read_text()
    assert log.count("serving on") == 2 and "--- pdserve launch: restart 1 ---" in log

    run.proc.terminate()
    assert run.wait_exit() == 0
    assert {c["state"] for c in run.state().values()} == {"stopped"}
    assert wait_until(lambda: not any(alive(pid) for pid in run.all_pids()))


def test_a_restart_that_stays_unhealthy_counts_as_an_exit(run: Run, tmp_path: Path) -> None:
    run.add("prefill-0")
    victim = run.add("decode-0")
    run.start(timeout_s=2.0, log_dir=tmp_path / "logs")
    run.wait_ready()
    health = tmp_path / "site-decode-0" / "health"
    health.unlink()  # its next runs serve, but /health is a 404
    os.killpg(victim.pids()[0], signal.SIGKILL)
    url = f"http://127.0.0.1:{victim.port}/health"
    late = f"component 'decode-0' did not become healthy at {url} within 2s"
    assert wait_until(lambda: late in run.stderr()), run.stderr()
    health.write_text("ok")
    assert wait_until(lambda: run.state()["decode-0"]["state"] == "up")
    assert run.state()["decode-0"]["restarts"] >= 2  # the kill, the unhealthy run
    assert f"{late} (last check: HTTP 404); restarting it in" in run.stderr()
    assert run.proc.poll() is None  # not the start's timeout: the launch goes on


def test_a_component_that_keeps_dying_is_given_up_on_once(run: Run, tmp_path: Path) -> None:
    others = [run.add("prefill-0"), run.add("decode-0")]
    run.add_command("decode-1", [sys.executable, "-c", CRASH], free_port())
    others.append(run.add("gateway", stage=1))
    run.start(log_dir=tmp_path / "logs", restart_budget=3)
    run.wait_ready()  # startup goes on without it: decode-0 serves
    assert run.state()["decode-1"] == {
        "pid": None,
        "state": "given_up",
        "restarts": 3,
        "last_exit": "exited with code 3",
    }
    assert all(serves(s.port) for s in others)
    pids = run.all_pids()
    time.sleep(1.0)  # many polls later: still said once, still serving, nothing restarted
    message = run.stderr()
    assert message.count("gave up on component 'decode-1'") == 1, message
    assert (
        "pdserve launch: gave up on component 'decode-1' after 3 restarts in 300s; its last run "
        "exited with code 3; its log ends with:\n    bad option: --frobnicate"
    ) in message
    assert "component 'decode-1' exited with code 3; restarting it in" in message
    assert "(restart 3 of 3 in 300s)" in message
    assert run.proc.poll() is None and run.all_pids() == pids
    assert all(serves(s.port) for s in others)

    run.proc.terminate()
    assert run.wait_exit() == 0
    assert wait_until(lambda: not any(alive(pid) for pid in pids))


def test_giving_up_on_the_gateway_stops_everything(run: Run) -> None:
    run.add("prefill-0")
    run.add("decode-0")
    gateway = run.add("gateway", stage=1)
    run.start(restart_budget=0)  # never restart: the first exit gives up
    run.wait_ready()
    pids = run.all_pids()
    os.killpg(gateway.pids()[0], signal.SIGKILL)
    assert run.wait_exit() == 1
    message = run.stderr()
    assert (
        "gave up on component 'gateway' without a restart (launch.restart_budget is 0); its "
        "last run was killed by SIGKILL; with no gateway component left nothing can serve"
    ) in message
    assert "its log ends with:\n    serving on" in message
    assert "restarting it" not in message
    assert wait_until(lambda: not any(alive(pid) for pid in pids)), "orphans left behind"


def test_a_drained_exit_restarts_at_once_outside_the_crash_budget(run: Run, tmp_path: Path) -> None:
    run.add("decode-0")
    node = run.add("prefill-0", on_term="record")  # SIGTERM: it drains and exits 0
    # NOTE: a crash would wait a minute for its restart, and one more would be given up on
    backoff = {"restart_backoff_s": 60.0, "restart_backoff_max_s": 60.0}
    run.start(log_dir=tmp_path / "logs", restart_budget=1, **backoff)
    run.wait_ready()
    for restarts in range(1, 4):  # a rolling restart, three times over, uses none of the budget
        before = node.pids()
        os.kill(before[0], signal.SIGTERM)
        back = {"state": "up", "restarts": restarts}.items()
        assert wait_until(lambda b=back: b <= run.state()["prefill-0"].items()), run.stderr()
        assert node.pids()[0] != before[0] and serves(node.port)
        assert run.state()["prefill-0"]["last_exit"] == "exited with code 0"
    message = run.stderr()
    assert (
        message.count(
            "pdserve launch: component 'prefill-0' exited with code 0; restarting it now (a clean "
            "exit: not counted against the restart budget)"
        )
        == 3
    ), message
    assert "gave up" not in message

    os.killpg(node.pids()[0], signal.SIGKILL)  # a crash still counts, as the first of its budget
    crashed = "component 'prefill-0' was killed by SIGKILL; restarting it in 60s (restart 1 of 1"
    assert wait_until(lambda: crashed in run.stderr()), run.stderr()
    assert run.state()["prefill-0"]["state"] == "backoff"


def test_a_run_that_exits_0_before_it_is_healthy_counts_as_a_crash(run: Run) -> None:
    run.add("decode-0")
    run.add_command("prefill-0", [sys.executable, "-c", "print('nothing to do')"], free_port())
    run.start(restart_budget=1)
    assert run.wait_exit() == 1  # not restarted again and again at once: given up on
    message = run.stderr()
    assert "component 'prefill-0' exited with code 0; restarting it in 0.05s (restart 1" in message
    assert "gave up on component 'prefill-0' after 1 restarts in 300s" in message


def test_a_usage_error_at_start_fails_the_launch_without_a_retry(run: Run, tmp_path: Path) -> None:
    run.add_command("prefill-0", [sys.executable, "-c", USAGE_ERROR], free_port())
    run.add("decode-0")
    gateway = run.add("gateway", stage=1)
    run.start(log_dir=tmp_path / "logs")  # a budget of 5 restarts: none is spent on it
    assert run.wait_exit() == 1
    assert not run.ready.is_set()
    assert run.stderr() == (
        "pdserve launch: component 'prefill-0' exited with code 2 at start, a usage or config "
        "error that a restart would repeat, so the launcher stopped the cluster; its log ends "
        "with:\n    pdserve prefill: error: unrecognized arguments: --frobnicate\n"
    )
    assert run.state()["prefill-0"] == {
        "pid": None,
        "state": "given_up",
        "restarts": 0,
        "last_exit": "exited with code 2",
    }
    assert not gateway.pidfile.exists()
    run.stand_ins.remove(gateway)
    assert wait_until(lambda: not any(alive(pid) for pid in run.written_pids()))


def test_exit_code_2_after_a_healthy_run_is_restarted_as_a_crash(run: Run) -> None:
    node = run.add("decode-0", on_term="exit2")
    run.start()
    run.wait_ready()
    before = node.pids()
    os.kill(before[0], signal.SIGTERM)
    restarted = "component 'decode-0' exited with code 2; restarting it in 0.05s (restart 1 of 5"
    assert wait_until(lambda: restarted in run.stderr()), run.stderr()
    assert wait_until(lambda: node.pids()[0] != before[0] and serves(node.port))
    assert run.proc.poll() is None


def test_giving_up_on_every_prefill_stops_everything(run: Run) -> None:
    prefill = run.add("prefill-0")
    run.add("decode-0")
    run.add("gateway", stage=1)
    run.start(restart_budget=0)
    run.wait_ready()
    pids = run.all_pids()
    os.killpg(prefill.pids()[0], signal.SIGKILL)
    assert run.wait_exit() == 1
    assert (
        "gave up on component 'prefill-0' without a restart (launch.restart_budget is 0); its "
        "last run was killed by SIGKILL; with no prefill component left nothing can serve, so "
        "the launcher stopped the cluster"
    ) in run.stderr()
    assert wait_until(lambda: not any(alive(pid) for pid in pids)), "orphans left behind"


def test_a_component_no_role_needs_is_given_up_and_the_rest_serve(run: Run) -> None:
    prefill = run.add("prefill-0", needed=False)  # a group launch.py marks as not needed
    decode = run.add("decode-0")
    run.start(restart_budget=0)
    run.wait_ready()
    os.killpg(prefill.pids()[0], signal.SIGKILL)
    assert wait_until(lambda: "gave up on component 'prefill-0'" in run.stderr())
    assert run.proc.poll() is None and serves(decode.port)


def test_a_stop_records_how_each_last_run_ended(run: Run, tmp_path: Path) -> None:
    node = run.add("decode-0", on_term="record")  # drains and exits 0 on SIGTERM
    stubborn = run.add("prefill-0", on_term="ignore")
    run.start(log_dir=tmp_path / "logs", grace_s=0.5)
    run.wait_ready()
    os.killpg(node.pids()[0], signal.SIGKILL)
    back = {"state": "up", "restarts": 1, "last_exit": "was killed by SIGKILL"}
    assert wait_until(lambda: back.items() <= run.state()["decode-0"].items())
    run.proc.terminate()
    assert run.wait_exit() == 0
    state = run.state()
    assert state["decode-0"] == {
        "pid": None,
        "state": "stopped",
        "restarts": 1,
        "last_exit": "exited with code 0",
    }
    assert (state["prefill-0"]["state"], state["prefill-0"]["last_exit"]) == (
        "stopped",
        "was killed by SIGKILL",
    )
    assert wait_until(lambda: not any(alive(pid) for pid in stubborn.pids()))


def test_killing_the_launcher_stops_every_component(run: Run) -> None:
    """kill -9 of the launcher: each component gets SIGTERM (drains and goes) instead of living
    on as an orphan that holds its ports."""
    nodes = [run.add("prefill-0", on_term="record"), run.add("decode-0", on_term="record")]
    gateway = run.add("gateway", stage=1)
    run.start()
    run.wait_ready()
    leaders = [s.pids()[0] for s in run.stand_ins]
    run.proc.kill()
    run.proc.wait()
    assert wait_until(lambda: not any(alive(pid) for pid in leaders)), "orphans left behind"
    for node in nodes:
        assert node.stop_record().keys() == {"term", "exit"}  # a drain, not a kill
    assert wait_until(lambda: not serves(gateway.port))


def test_the_last_decode_failing_at_start_names_itself_with_its_log(run: Run) -> None:
    run.add("prefill-0")
    run.add_command("decode-0", [sys.executable, "-c", CRASH], free_port())
    gateway = run.add("gateway", stage=1)
    run.start(restart_budget=1)
    assert run.wait_exit() == 1
    assert not run.ready.is_set()
    message = run.stderr()
    assert "component 'decode-0' exited with code 3; restarting it in 0.05s" in message
    assert (
        "gave up on component 'decode-0' after 1 restarts in 300s; its last run exited with "
        "code 3; with no decode component left nothing can serve"
    ) in message
    assert "its log ends with:\n    bad option: --frobnicate" in message
    assert not gateway.pidfile.exists()  # never started: nothing could serve
    run.stand_ins.remove(gateway)
    assert wait_until(lambda: not any(alive(pid) for pid in run.written_pids()))


def test_health_timeout_names_the_component(run: Run) -> None:
    run.add("prefill-0")
    never = run.add("decode-0", healthy=False)  # serves, but /health is a 404
    gateway = run.add("gateway", stage=1)
    run.start(timeout_s=1.0)
    assert run.wait_exit() == 1
    message = run.stderr()
    url = f"http://127.0.0.1:{never.port}/health"
    assert f"component 'decode-0' did not become healthy at {url} within 1s" in message
    assert "HTTP 404" in message and "serving on" in message
    assert not gateway.pidfile.exists()  # the next stage waits for this one
    run.stand_ins.remove(gateway)
    assert wait_until(lambda: not any(alive(pid) for pid in run.all_pids()))


def test_log_dir_gets_one_file_per_component(run: Run, tmp_path: Path) -> None:
    run.add("prefill-0")
    run.start(log_dir=tmp_path / "logs")
    run.wait_ready()
    run.proc.terminate()
    assert run.wait_exit() == 0
    assert "serving on" in (tmp_path / "logs" / "prefill-0.log").read_text()
    assert "[prefill-0]" not in run.stderr()


# --- launch settings -----------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap() -> None:
    settings = LaunchSettings(restart_backoff_s=1.0, restart_backoff_max_s=30.0)
    assert [settings.backoff_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert LaunchSettings(restart_budget=10**6).backoff_s(10**6) == 30.0


def test_flags_override_the_config_and_are_checked() -> None:
    config = LaunchSettings(grace_s=20.0, health_timeout_s=100.0)
    assert with_flags(config, health_timeout_s=None, grace_s=None) == config
    flagged = with_flags(config, health_timeout_s=5.0, grace_s=None)
    assert (flagged.health_timeout_s, flagged.grace_s) == (5.0, 20.0)
    with pytest.raises(ConfigError, match=r"--grace: must be >= 0, got -1"):
        with_flags(config, grace_s=-1.0)


# --- the launcher's plan of a config -------------------------------------------------------------


def test_components_of_a_config_run_the_cli_with_the_same_overrides() -> None:
    overrides = ["gateway.port=31000", "prefill.0.engine.max_running=32"]
    cluster = load_cluster(DEFAULT_CONFIG, overrides)
    components = cluster_components(cluster, DEFAULT_CONFIG, overrides)
    assert [c.name for c in components] == ["prefill-0", "decode-0", "gateway"]
    gateway = components[-1]
    assert gateway.health_url == "http://127.0.0.1:31000/health"
    assert gateway.argv[1:] == (
        "-m",
        "cluster.cli",
        "gateway",
        "--config",
        str(DEFAULT_CONFIG),
        "--name",
        "gateway",
        "--set",
        "gateway.port=31000",
        "--set",
        "prefill.0.engine.max_running=32",
    )
    assert components[0].argv[3] == "prefill" and components[1].argv[3] == "decode"
    assert [c.stage for c in components] == [0, 0, 1]  # the gateway finds its nodes up
    # nothing serves without a gateway or a decode node (decode nodes prefill while no prefill
    # node is left: gateway.prefill_fallback)
    assert [c.needed_group for c in components] == [None, "decode", "gateway"]


@pytest.mark.parametrize(
    ("overrides", "prefill"),
    [
        ([], None),
        (["gateway.prefill_fallback=false"], "prefill"),
        (["gateway.prefill_fallback=false", "decode.0.local_prefill_threshold=64"], "prefill"),
        (["gateway.prefill_fallback=false", "transfer.backend=none"], None),
    ],
    ids=["fallback", "no_fallback", "local_prefill_threshold", "colocated"],
)
def test_prefill_nodes_are_needed_only_without_a_fallback(
    overrides: list[str], prefill: str | None
) -> None:
    """Prefill nodes are needed only where the gateway may not send their requests to decode
    nodes to prefill; a decode node prefilling short prompts itself does not change that."""
    cluster = load_cluster(DEFAULT_CONFIG, overrides)
    components = cluster_components(cluster, DEFAULT_CONFIG, overrides)
    assert [c.name for c in components] == ["prefill-0", "decode-0", "gateway"]
    assert [c.needed_group for c in components] == [prefill, "decode", "gateway"]


def test_cpu_kv_pools_over_the_machine_fail_at_load(capsys: pytest.CaptureFixture) -> None:
    """A GPU config moved to CPU keeps its mem_fraction (0.85) in every rank process: the
    launcher refuses it, rather than start processes the kernel kills for memory."""
    sets = ["engine.max_total_tokens=null", "engine.mem_fraction=0.5"]
    with pytest.raises(ConfigError) as failed:
        dry_run(str(DEFAULT_CONFIG), sets)
    assert str(failed.value) == (
        "engine.mem_fraction: the 2 CPU rank processes this launch starts would each take "
        "their engine.mem_fraction of this machine's free memory for a KV pool, 1.00x that "
        "memory together; set engine.mem_fraction to at most 0.450 (or engine.max_total_tokens) "
        "on every node"
    )
    assert dry_run(str(DEFAULT_CONFIG), [*sets, "prefill.0.engine.max_total_tokens=4096"]) == 0
    assert dry_run(str(DEFAULT_CONFIG), [sets[0], "engine.mem_fraction=0.45"]) == 0
    capsys.readouterr()


def test_dry_run_prints_the_other_hosts_commands_of_a_node_spanning_hosts(
    capsys: pytest.CaptureFixture,
) -> None:
    sets = ["decode.0.engine.tp_size=2", "decode.0.engine.nnodes=2",
            "decode.0.engine.dist_init_addr=127.0.0.1:29500"]  # fmt: skip
    assert dry_run(str(DEFAULT_CONFIG), sets) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("# decode-0's other node ranks, each on its own host (not started by launch)")
    command = lines[at + 1].split()
    assert command[1:7] == ["-m", "cluster.cli", "decode", "--config", str(DEFAULT_CONFIG),
                            "--name"]  # fmt: skip
    assert command[-2:] == ["--node-rank", "1"] and "decode.0.engine.nnodes=2" in command


def test_busy_port_is_reported_before_anything_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cluster = load_cluster(DEFAULT_CONFIG, [f"gateway.port={port}"])
        with pytest.raises(
            ConfigError, match=rf"gateway port .*127.0.0.1:{port} is already in use"
        ):
            check_can_listen(cluster)


def test_foreign_host_is_reported_with_the_multi_host_commands(tmp_path: Path) -> None:
    cluster = load_cluster(DEFAULT_CONFIG, ["decode.0.host=192.0.2.10"])
    with pytest.raises(ConfigError, match=r"192\.0\.2\.10 is not an address of this machine"):
        check_can_listen(cluster)


def test_launch_with_a_bad_config_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pdserve_main(["launch", str(DEFAULT_CONFIG), "--set", "gateway.prot=1"]) == 2
    assert "did you mean 'port'?" in capsys.readouterr().err
    assert pdserve_main(["launch", str(DEFAULT_CONFIG), "--grace", "-1"]) == 2
    assert "--grace: must be >= 0" in capsys.readouterr().err  # before anything starts
    assert pdserve_main(["launch", str(tmp_path / "missing.yaml")]) == 2
    assert "local-cpu" in capsys.readouterr().err  # lists the shipped configs


# --- the real cluster ----------------------------------------------------------------------------


@dataclass
class Launch:
    """`pdserve launch` of the default config on free ports (its stderr in a file)."""

    proc: subprocess.Popen
    overrides: list[str]
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.overrides[0].split('=')[1]}"

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == f"pdserve cluster ready: {self.url}/v1", self.stderr()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture
def launch_default(tmp_path: Path):
    """`launch_default(*overrides, *args) -> Launch`; every launcher it started is gone after."""
    started: list[Launch] = []

    def start(*more: str, args: tuple[str, ...] = ()) -> Launch:
        ports = free_ports(4)
        overrides = [
            f"gateway.port={ports[0]}",
            f"prefill.0.port={ports[1]}",
            f"prefill.0.bootstrap_port={ports[2]}",
            f"decode.0.port={ports[3]}",
            *more,
        ]
        sets = [arg for text in overrides for arg in ("--set", text)]
        env = {**os.environ, "PDSERVE_CACHE": str(tmp_path / "models")}
        stderr_path = tmp_path / f"stderr-{len(started)}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "launch", *sets, "--timeout", "120", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr_path.open("w"),
            text=True,
        )
        started.append(Launch(proc, overrides, stderr_path))
        return started[-1]

    yield start
    for launch in started:
        if launch.proc.poll() is None:
            launch.proc.kill()
            launch.proc.wait()


@pytest.mark.slow
def test_pdserve_launch_serves_the_default_config(launch_default) -> None:
    launch = launch_default()
    proc = launch.proc
    launch.wait_ready()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{launch.url}/v1/models", timeout=10) as response:
        assert "tiny-qwen3" in response.read().decode()
    body = {"model": "tiny-qwen3", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    request = urllib.request.Request(
        f"{launch.url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with opener.open(request, timeout=60) as response:
        assert json.loads(response.read())["usage"]["completion_tokens"] == 4
    groups = children_of(proc.pid)  # each component leads its own process group
    assert len(groups) == 3
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    assert not any(group_has_live_member(g) for g in groups), "orphans left behind"


@pytest.mark.slow
def test_a_setting_a_node_cannot_start_with_fails_the_launch_in_one_line(launch_default) -> None:
    """The engine refuses the device at start: the node says so in one line and exits 2, and
    the launcher stops at once, quoting that line (no retries, no traceback)."""
    launch = launch_default("prefill.0.engine.device=cuda:99")
    assert launch.proc.wait(timeout=120) == 1
    message = launch.stderr()
    assert (
        "pdserve launch: component 'prefill-0' exited with code 2 at start, a usage or config "
        "error that a restart would repeat, so the launcher stopped the cluster; its log ends "
        "with:\n    pdserve prefill: error: engine.device is 'cuda:99' but"
    ) in message
    assert "Traceback" not in message and "restarting it" not in message, message
    assert "[prefill-0] pdserve prefill: error: engine.device is 'cuda:99'" in message


@pytest.mark.slow
def test_killing_the_launcher_leaves_no_process_and_no_port_behind(
    launch_default, tmp_path: Path
) -> None:
    """kill -9 of `pdserve launch`: every process of every component (a node's scheduler
    process too) goes, so the same cluster launches again."""
    launch = launch_default(args=("--log-dir", str(tmp_path / "logs")))
    launch.wait_ready()
    written = json.loads((tmp_path / "logs" / "launch-state.json").read_text())
    state = written["components"]
    groups = [c["pid"] for c in state.values()]
    assert len(groups) == 3 and all(group_has_live_member(g) for g in groups)
    # what tells a reader the file is stale once the launcher is gone
    assert written["launcher"]["pid"] == launch.proc.pid
    try:
        launch.proc.kill()
        launch.proc.wait()
        gone = wait_until(lambda: not any(group_has_live_member(g) for g in groups), 60.0)
        assert gone, "orphans left behind"
    finally:
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
    check_can_listen(load_cluster(DEFAULT_CONFIG, launch.overrides))  # every port is free
