"""Chaos soak: a launched cluster under steady streaming load while its nodes are killed, frozen
and stopped; then what the clients saw, what the gateway did, and what the nodes were left with.

    python scripts/chaos.py configs/local-2p2d.yaml --minutes 10 [--seed 1] [--log-dir DIR]
    python scripts/chaos.py configs/local-2p2d.yaml --minutes 10 --no-faults   # the baseline

1. `pdserve launch CONFIG --log-dir DIR` (DIR: a new temp dir unless given; the launcher's own
   output goes to DIR/launcher.log, each component's to DIR/NAME.log).
2. Load: `pdserve bench` rounds until the time is up (bench runs a number of prompts, not a
   duration; each round is sized at the gateway's pace to about --round-s of sending, and
   started while the one before finishes, as bench takes seconds to load its tokenizer),
   random dataset with varying input and output lengths, streaming, at --max-concurrency, the
   rounds taking turns over the three APIs (/v1/completions, /v1/chat/completions, /generate).
   Each round's JSONL record (with per-request errors) is DIR/bench/round-K.jsonl. A failure
   is what bench counts as one: a non-200 answer or an error event in the stream.
3. After --warmup-s of load (fault-free), every component's RSS is taken; then, unless
   --no-faults, scripts/chaos_faults.py injects a fault every 15-40 s (seeded).
4. At the end: load stops, the cluster is given up to --idle-timeout-s to have every component
   up and nothing in flight or held; then the gateway's counters, the launcher's restarts, the
   pages each node still holds and its GET /check_integrity, and RSS again (growth only for
   components not restarted since warm-up). The launcher is stopped last.

The last line printed is JSON (stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from chaos_cluster import (
    REPO,
    REQUESTS_TOTAL,
    GatewayMeter,
    LaunchFailed,
    Topology,
    cluster_idle,
    gateway_metrics,
    launch_state,
    node_pages,
    rss_report,
    rss_sample,
    start_launcher,
    stop_launcher,
    topology,
    wait_ready,
    wait_until,
)
from chaos_faults import FaultInjector

BACKENDS = ("sglang-oai", "sglang-oai-chat", "sglang")  # completions, chat, native /generate
MIN_ROUND_S = 5.0  # no round is started with less load time than this left
POLL_S = 0.2
FIRST_ROUND = 4  # x --max-concurrency prompts: the gateway's pace is learnt from this round
# rounds are sized for this share of the pace: a fault or a restart slows the cluster, and a
# round cannot be cut short (bench reports only at its end), so the last one would overrun
PACE_MARGIN = 0.8
SENDING_MARK = b"#Output tokens:"  # bench's last line before it sends (cluster/bench/measure.py)
ROUND_GRACE_S = 180.0  # a round may overrun its plan by this much before it counts as hung
LABEL = re.compile(r'(\w+)="([^"]*)"')
ERROR_TEXT = 160  # errors are grouped by their first characters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("config", help="a cluster YAML or the name of a shipped config")
    p.add_argument("--minutes", type=float, required=True, help="of load, from the first request")
    p.add_argument("--no-faults", action="store_true", help="load only (the baseline)")
    p.add_argument("--seed", type=int, default=1, help="faults and prompts")
    p.add_argument("--log-dir", type=Path, help="default: a new temp dir (printed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as launch's")
    p.add_argument("--max-concurrency", type=int, default=12)
    p.add_argument("--input-len", type=int, default=512, help="longest prompt (tokens)")
    p.add_argument("--output-len", type=int, default=256, help="longest output (tokens)")
    p.add_argument("--range-ratio", type=float, default=0.1, help="lengths in [L*ratio, L]")
    p.add_argument("--warmup-s", type=float, default=30.0, help="fault-free load before RSS")
    p.add_argument("--round-s", type=float, default=60.0, help="planned length of a bench round")
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--idle-timeout-s", type=float, default=120.0)
    p.add_argument("--stop-timeout-s", type=float, default=150.0, help="for the launcher's stop")
    return p.parse_args(argv)


@dataclass
class Round:
    """One `pdserve bench` subprocess and what it was asked for."""

    index: int
    backend: str
    prompts: int
    proc: subprocess.Popen
    log: Path
    out: Path
    started: float
    kill_at: float
    sending_at: float | None = None  # when bench had its prompts and began to send

    def sending(self) -> bool:
        """Whether bench has loaded its tokenizer and prompts (it prints their token counts
        right before the first send)."""
        if self.sending_at is None and SENDING_MARK in self.log.read_bytes():
            self.sending_at = time.monotonic()
        return self.sending_at is not None

    @property
    def startup_s(self) -> float:
        return (self.sending_at or self.started) - self.started


class Load:
    """`pdserve bench` rounds, one after another, and their added-up counts.

    A bench process spends seconds (tens on a busy machine) loading its tokenizer before it
    sends anything, so the next round is started that long before the current one is due to end
    at the gateway's pace: the load stays near --max-concurrency instead of pausing between
    rounds (two may overlap for a moment; `inflight_after_warmup` says how steady it was).
    """

    def __init__(self, args: argparse.Namespace, gateway: str, log_dir: Path) -> None:
        self.args = args
        self.gateway = gateway
        self.dir = log_dir / "bench"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.active: list[Round] = []
        self.rounds: list[dict[str, Any]] = []
        self.errors: Counter[str] = Counter()
        self.startup_s = 10.0  # until a round has shown how long bench takes to begin sending
        self.startups: list[float] = []
        self.meter = GatewayMeter(gateway)
        self.began = time.monotonic()  # then: when the first request was sent
        self.warmed_at = 0.0  # when the warm-up ended (the RSS baseline, the first fault turn)

    def run(self, load_s: float, warmup_s: float, on_warm: Callable[[], None]) -> None:
        """Rounds for `load_s` from the first request (the last round sized to end near then);
        `on_warm()` once, `warmup_s` after the first request."""
        warmed = False
        try:
            first = self.start_round(None)
            while first.sending_at is None and first in self.active:
                self.collect()
                time.sleep(POLL_S)
            self.began = first.sending_at or time.monotonic()
            deadline, warm_at = self.began + load_s, self.began + warmup_s
            while self.active or self.may_start(deadline):
                if not warmed and time.monotonic() >= warm_at:
                    on_warm()
                    warmed = True
                    self.warmed_at = time.monotonic()
                self.meter.sample()
                self.collect()
                if self.due() and self.may_start(deadline):
                    self.start_round(deadline)
                time.sleep(POLL_S)
        finally:
            for r in self.active:  # NOTE: Ctrl-C, SIGTERM or an error here: no orphaned load
                r.proc.kill()
        if not warmed:
            on_warm()

    def may_start(self, deadline: float) -> bool:
        return deadline - time.monotonic() - self.startup_s >= MIN_ROUND_S

    def due(self) -> bool:
        """No round runs, or the newest one is about to end (its expected end, at the last
        pace, is within one bench start-up)."""
        if not self.active:
            return True
        newest, pace = self.active[-1], self.meter.pace()
        if pace is None or not newest.sending():
            return False
        assert newest.sending_at is not None
        ends = newest.sending_at + newest.prompts / pace
        return time.monotonic() >= ends - self.startup_s

    def start_round(self, deadline: float | None) -> Round:
        """A new bench round sized to send for --round-s, or until `deadline`, at the current
        pace (the first one, with no deadline yet, for FIRST_ROUND x --max-concurrency)."""
        now = time.monotonic()
        load_s = self.args.round_s
        if deadline is not None:
            load_s = min(load_s, deadline - now - self.startup_s)
        floor, pace = self.args.max_concurrency, self.meter.pace()
        prompts = FIRST_ROUND * floor
        if pace is not None:
            prompts = max(floor, int(PACE_MARGIN * pace * load_s))
        index = len(self.rounds) + len(self.active)
        backend = BACKENDS[index % len(BACKENDS)]
        log, out = self.dir / f"round-{index}.log", self.dir / f"round-{index}.jsonl"
        proc = self.bench(index, backend, prompts, out, log)
        kill_at = now + self.startup_s + 3 * max(load_s, MIN_ROUND_S) + ROUND_GRACE_S
        self.active.append(Round(index, backend, prompts, proc, log, out, now, kill_at))
        return self.active[-1]

    def bench(
        self, index: int, backend: str, prompts: int, out: Path, log: Path
    ) -> subprocess.Popen:
        a = self.args
        argv = [sys.executable, "-m", "cluster.cli", "bench", "--backend", backend]
        argv += ["--base-url", self.gateway, "--dataset-name", "random"]
        argv += ["--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len)]
        argv += ["--random-range-ratio", str(a.range_ratio), "--num-prompts", str(prompts)]
        argv += ["--max-concurrency", str(a.max_concurrency), "--seed", str(a.seed + index)]
        argv += ["--warmup-requests", "0", "--disable-tqdm"]  # a failed warmup would end it
        argv += ["--output-file", str(out), "--output-details"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its SENDING_MARK is seen at once
        with open(log, "wb") as sink:
            return subprocess.Popen(argv, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env)

    def collect(self) -> None:
        """Count every round that ended (or overran its time and was killed); learn how long
        bench takes to start (the longer of the last two, as a busy machine slows it down)."""
        for r in list(self.active):
            if r.sending_at is None and r.sending():  # it just began
                self.startups.append(r.startup_s)
                self.startup_s = max(self.startups[-2:])
            if r.proc.poll() is None and time.monotonic() < r.kill_at:
                continue
            if r.proc.poll() is None:
                r.proc.kill()
            self.active.remove(r)
            self.count(r, r.proc.wait())

    def count(self, r: Round, code: int) -> None:
        record = read_record(r.out)
        done = {
            "round": r.index,
            "backend": r.backend,
            "sent": r.prompts,
            "completed": record.get("completed", 0) if record else 0,
            "failed": record.get("failed", 0) if record else 0,
            "unaccounted": 0 if record else r.prompts,  # bench died or hung: nothing reported
            "short": cut_short(record) if record else 0,
            "startup_s": round(r.startup_s, 1) if r.sending_at else None,
            "load_s": round(record["duration"], 1) if record else None,
            "exit": code,
        }
        self.rounds.append(done)
        for error in (record or {}).get("errors", []):
            if error:
                self.errors[f"{r.backend}: {error[:ERROR_TEXT]}"] += 1
        print(f"chaos: round {json.dumps(done)}", file=sys.stderr, flush=True)

    def totals(self) -> dict[str, Any]:
        keys = ("sent", "completed", "failed", "unaccounted", "short")
        sums = {k: sum(r[k] for r in self.rounds) for k in keys}
        by_backend: dict[str, Counter[str]] = {}
        for r in self.rounds:
            by_backend.setdefault(r["backend"], Counter()).update({k: r[k] for k in keys})
        return {
            "requests": sums,
            "by_backend": {b: dict(c) for b, c in by_backend.items()},
            "rounds": len(self.rounds),
            "inflight_after_warmup": self.meter.inflight_summary(self.warmed_at),
            "errors": dict(self.errors.most_common(10)),
        }


def cut_short(record: dict[str, Any]) -> int:
    """Answers that succeeded with fewer tokens than asked for, by the server's own count (the
    load ignores EOS, so every whole answer has them all): a stream cut without an error."""
    rows = zip(
        record.get("reported_output_lens", []),
        record.get("requested_output_lens", []),
        record.get("errors", []),
    )
    return sum(1 for got, asked, error in rows if not error and got is not None and got < asked)


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def soak(args: argparse.Namespace, gateway: str, top: Topology, log_dir: Path) -> dict[str, Any]:
    """Load (and faults) for --minutes, then the cluster's state once it is idle."""
    load = Load(args, gateway, log_dir)
    faults = None if args.no_faults else FaultInjector(top, log_dir, args.seed)
    warm: dict[str, dict] = {}

    def on_warm() -> None:
        warm.update(rss_sample(log_dir))
        if faults is not None:
            faults.start(load.began)

    try:
        load.run(60.0 * args.minutes, args.warmup_s, on_warm)
    finally:
        if faults is not None:
            faults.stop()
    load_s = time.monotonic() - load.began
    idle = wait_until(lambda: all_up(log_dir) and cluster_idle(top), args.idle_timeout_s)
    return report(load, faults, warm, gateway, top, log_dir, idle, load_s)


def all_up(log_dir: Path) -> bool:
    return all(c.get("state") == "up" for c in launch_state(log_dir).values())


def report(
    load: Load,
    faults: FaultInjector | None,
    warm: dict[str, dict],
    gateway: str,
    top: Topology,
    log_dir: Path,
    idle: bool,
    load_s: float,
) -> dict[str, Any]:
    metrics = gateway_metrics(gateway)
    pages = node_pages(top)
    return {
        **load.totals(),
        "load_s": round(load_s, 1),
        "migrated": int(metrics.get("pdserve_gateway_migrations_total", 0)),
        "retries": int(metrics.get("pdserve_gateway_retries_total", 0)),
        "stream_errors": int(metrics.get("pdserve_gateway_stream_errors_total", 0)),
        "gateway_requests": answered_by_route(metrics),
        "restarts": {n: c.get("restarts", 0) for n, c in launch_state(log_dir).items()},
        "faults": faults.counts() if faults else {},
        "fault_log": faults.record if faults else [],
        "faults_skipped": faults.skipped if faults else 0,
        "idle_at_end": idle,
        "pages_not_free": sum(p.get("not_free", 0) for p in pages.values()),
        "integrity_ok": all(p.get("integrity") is True for p in pages.values()),
        "nodes": pages,
        "rss": rss_report(warm, rss_sample(log_dir)),
        "rss_note": "KiB summed over each component's process group; growth_pct only for "
        "components not restarted since the warm-up sample (else null)",
        "log_dir": str(log_dir),
    }


def answered_by_route(metrics: dict[str, float]) -> dict[str, int]:
    """`route status` -> requests the gateway answered so, from its requests_total samples."""
    answered = {}
    for key, value in metrics.items():
        labels = dict(LABEL.findall(key)) if key.startswith(REQUESTS_TOTAL + "{") else None
        if labels:
            answered[f"{labels.get('route')} {labels.get('status')}"] = int(value)
    return answered


def interrupt(signum: int, _frame: object) -> NoReturn:
    """SIGTERM as Ctrl-C: the same `finally` blocks resume frozen nodes and stop the cluster."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        top = topology(args.config, args.set)
    except (ValueError, OSError) as exc:  # a bad config or --set, named by the loader
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    log_dir = (args.log_dir or Path(tempfile.mkdtemp(prefix="pdserve-chaos-"))).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"chaos: logs in {log_dir}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, interrupt)
    launcher = start_launcher(top.config, args.set, log_dir)
    try:
        gateway = wait_ready(launcher, log_dir, args.ready_timeout_s)
        result = soak(args, gateway, top, log_dir)
    except LaunchFailed as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chaos: interrupted; stopping the cluster", file=sys.stderr, flush=True)
        return 130
    finally:
        exit_code = stop_launcher(launcher, args.stop_timeout_s)
        print(f"chaos: pdserve launch stopped (exit {exit_code})", file=sys.stderr, flush=True)
    result["launcher_exit"] = exit_code
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
