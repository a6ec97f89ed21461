"""`pdserve status` and `pdserve revive` over a running launcher's log dir; a component the
launcher gave up on starts again: by itself after `revive_after_s`, or at once on SIGHUP
(`pdserve revive --log-dir DIR`), with a fresh restart budget.

The launcher and its components are test_launch.py's real processes (a supervisor process over
small HTTP servers); the flaky component here crashes while its FLAG file exists, as a node does
until its cause (a full disk, a lost GPU) is fixed.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from cluster.cli import main as pdserve_main
from cluster.launch_settings import LaunchSettings
from tests.cluster.test_launch import COMPONENT, Run, serves, wait_until
from tests.ports import free_port

FLAKY = "import os, sys\nif os.path.exists(sys.argv[5]): print('disk full'); raise SystemExit(3)\n"


def add_flaky(run: Run, name: str, flag: Path) -> int:
    """A component that exits 3 while `flag` exists, and serves like run.add's after."""
    port, site = free_port(), run.tmp / f"site-{name}"
    site.mkdir()
    (site / "health").write_text("ok")
    pidfile = run.tmp / f"{name}.pids"
    argv = [sys.executable, "-c", FLAKY + COMPONENT, str(port), str(site), str(pidfile)]
    run.add_command(name, [*argv, "default", str(flag)], port)
    return port


def test_pdserve_revive_starts_what_was_given_up_on_with_a_fresh_budget(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    logs, flag = tmp_path / "logs", tmp_path / "broken"
    run.add("decode-0")
    flag.write_text("")
    port = add_flaky(run, "decode-1", flag)
    run.start(log_dir=logs, restart_budget=2, revive_after_s=0)  # 0: never by itself
    run.wait_ready()  # the start went on without decode-1
    assert run.state()["decode-1"]["state"] == "given_up"
    capsys.readouterr()
    assert pdserve_main(["status", "--log-dir", str(logs)]) == 1  # not all up
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(f"launcher pid {run.proc.pid}: running; state written ")
    assert table[1].split() == ["component", "state", "pid", "restarts", "health", "last", "exit"]
    assert table[2].split()[:5] == ["decode-0", "up", str(run.stand_ins[0].pids()[0]), "0",
                                    "healthy"]  # fmt: skip
    assert table[3].split() == [
        "decode-1",
        "given_up",
        "-",
        "2",
        "-",
        "exited",
        "with",
        "code",
        "3",
    ]
    flag.unlink()  # the cause is fixed; the launcher does not know
    assert pdserve_main(["revive", "--log-dir", str(logs)]) == 0
    out = capsys.readouterr().out
    assert "pdserve revive: starting decode-1 again" in out, out

    assert wait_until(lambda: run.state()["decode-1"]["state"] == "up", 20)
    assert serves(port)
    assert run.state()["decode-1"]["restarts"] == 3  # 2 spent, then the revival
    message = run.stderr()
    assert "starting component 'decode-1' again on SIGHUP, with a fresh budget" in message
    assert "component 'decode-1' is healthy again" in message
    assert pdserve_main(["status", "--log-dir", str(logs), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["launcher"]["running"] and status["launcher"]["pid"] == run.proc.pid
    assert {n: (c["state"], c["health"]) for n, c in status["components"].items()} == {
        "decode-0": ("up", "healthy"),
        "decode-1": ("up", "healthy"),
    }

    assert pdserve_main(["revive", "--log-dir", str(logs)]) == 0
    assert "has given up on no component" in capsys.readouterr().out
    run.proc.send_signal(signal.SIGHUP)  # nothing given up on: said, and nothing else happens
    assert wait_until(lambda: "SIGHUP: no component is given up on" in run.stderr())
    assert run.proc.poll() is None and serves(port)

    run.proc.terminate()
    assert run.wait_exit() == 0
    assert pdserve_main(["revive", "--log-dir", str(logs)]) == 1  # the state file outlives it
    assert f"no `pdserve launch` runs with pid {run.proc.pid}" in capsys.readouterr().out
    assert pdserve_main(["status", "--log-dir", str(logs)]) == 1
    assert "NOT running (this state is stale)" in capsys.readouterr().out


def test_a_component_given_up_on_is_started_again_after_revive_after_s(
    run: Run, tmp_path: Path
) -> None:
    logs, flag = tmp_path / "logs", tmp_path / "broken"
    run.add("decode-0")
    flag.write_text("")
    port = add_flaky(run, "decode-1", flag)
    run.start(log_dir=logs, restart_budget=1, revive_after_s=1.0)
    run.wait_ready()
    assert wait_until(lambda: "gave up on component 'decode-1'" in run.stderr())
    flag.unlink()
    assert wait_until(lambda: run.state()["decode-1"]["state"] == "up", 20), run.stderr()
    assert serves(port)
    assert "starting component 'decode-1' again 1s after giving up on it" in run.stderr()


def test_revive_without_a_launch_state_names_the_flag(tmp_path: Path, capsys) -> None:
    assert pdserve_main(["revive", "--log-dir", str(tmp_path)]) == 2
    assert "give the --log-dir that `pdserve launch` was started with" in capsys.readouterr().err


def test_revive_after_s_is_checked() -> None:
    assert LaunchSettings(revive_after_s=0).revive_after_s == 0
    with pytest.raises(ValueError, match="revive_after_s must be >= 0, got -1"):
        LaunchSettings(revive_after_s=-1)


def test_the_launch_state_names_the_launcher_by_pid_and_start(run: Run, tmp_path: Path) -> None:
    run.add("decode-0")
    run.start(log_dir=tmp_path / "logs")
    run.wait_ready()
    launcher = json.loads((tmp_path / "logs" / "launch-state.json").read_text())["launcher"]
    assert launcher["pid"] == run.proc.pid
    stat = Path(f"/proc/{run.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert launcher["start"] == int(stat[19])
