"""A node's stats line (node/stats_log.py): rates over the interval just ended, the gauges now, an
idle node quiet; the engine's counters it reads; the line in a real node's log at log_level info
(the setting travelling from the cluster YAML); and the per-request DEBUG line of the HTTP side."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.config import parse_cluster
from cluster.schema import ConfigError
from engine.counters import StepCounters
from engine.request import Req
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch
from node.channel import SchedulerClient
from node.jobs import JobRun
from node.settings import NodeSettings
from node.stats_log import StatsLog, StatsSample
from tests.gateway.servers import wait_until
from tests.ports import free_port

from .test_channel import StandInScheduler, jobs, run_with

NODE_START_TIMEOUT_S = 240.0
LINE_TIMEOUT_S = 60.0  # bounds waits that end as soon as the line is written


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


ZERO = {"prompt_tokens": 0, "generated_tokens": 0, "prefix_queried": 0, "prefix_hit": 0}
ZERO |= {"transfers_ok": 0, "transfers_failed": 0}


def sample(totals: dict[str, int], running: int = 0, waiting: int = 0) -> StatsSample:
    return StatsSample({"running": running, "waiting": waiting, "held": 0}, 0.412, totals)


def fields(line: str) -> dict[str, str]:
    head, *pairs = line.split(" ")
    assert head == "stats"
    return dict(pair.split("=", 1) for pair in pairs)


def test_rates_are_over_the_interval_and_an_idle_node_is_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, taken = Clock(), []
    stats = StatsLog("decode", 10.0, clock)

    def take(s: StatsSample) -> Callable[[], StatsSample]:
        """`s`, as the loop's sampler; `taken` records each call."""

        def sampled() -> StatsSample:
            taken.append(s)
            return s

        return sampled

    assert stats.tick(take(sample(ZERO))) is None  # the baseline
    clock.now += 9.9
    assert stats.tick(take(sample(ZERO | {"prompt_tokens": 9}))) is None  # not due
    assert len(taken) == 1
    clock.now += 0.1
    busy = {"prompt_tokens": 1000, "generated_tokens": 200, "prefix_queried": 800}
    busy |= {"prefix_hit": 200, "transfers_ok": 3, "transfers_failed": 1}
    with caplog.at_level(logging.INFO, logger="node.stats_log"):
        line = stats.tick(take(sample(busy, running=2, waiting=1)))
    assert line is not None and [r.getMessage() for r in caplog.records] == [line]
    assert caplog.records[0].levelno == logging.INFO  # log_level warning hides it
    assert fields(line) == {
        "role": "decode",
        "running": "2",
        "waiting": "1",
        "held": "0",
        "prompt_tok_s": "100.0",
        "gen_tok_s": "20.0",
        "kv_usage": "41.2%",
        "prefix_hit": "25.0%",
        "transfers_ok": "3",
        "transfers_failed": "1",
    }
    # a longer interval (a slow step) divides by the time that really passed
    clock.now += 20.0
    later = busy | {"generated_tokens": 600}
    line = stats.tick(take(sample(later, running=1)))
    assert line is not None
    assert (fields(line)["gen_tok_s"], fields(line)["transfers_ok"]) == ("20.0", "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="node.stats_log"):
        for _ in range(2):
            clock.now += 10.0
            assert stats.tick(take(sample(later))) is None  # nothing happened, nothing held
    assert caplog.records == []
    # a request waiting is activity, though no token moved
    clock.now += 10.0
    line = stats.tick(take(sample(later, waiting=4)))
    assert line is not None and fields(line)["waiting"] == "4"
    assert (fields(line)["gen_tok_s"], fields(line)["prefix_hit"]) == ("0.0", "0.0%")
    assert len(taken) == 6


def test_an_interval_of_zero_never_samples() -> None:
    clock = Clock()
    stats = StatsLog("prefill", 0.0, clock)
    for _ in range(3):
        clock.now += 100.0
        assert stats.tick(lambda: pytest.fail("sampled")) is None


def test_a_sample_reads_server_info_and_the_engine_counters() -> None:
    info = {"role": "decode", "free_pages": 30, "total_pages": 40, "running": 2, "waiting": 0}
    info |= {"held": 1, "prealloc": 3, "transferring": 1, "quarantined": 0, "uptime_s": 5.0}
    info["transfer"] = {"rooms": {"success": 4, "failed": 2, "declined": 7}}
    got = StatsSample.of(info, StepCounters(prompt_tokens=5, generated_tokens=6))
    assert got.gauges == {
        "running": 2,
        "waiting": 0,
        "held": 1,
        "prealloc": 3,
        "transferring": 1,
        "quarantined": 0,
    }
    assert got.kv_usage == 0.25
    assert (got.totals["prompt_tokens"], got.totals["generated_tokens"]) == (5, 6)
    assert (got.totals["transfers_ok"], got.totals["transfers_failed"]) == (4, 2)


def test_step_counters_count_prompt_positions_samples_and_prefix_hits() -> None:
    cached = Req("a", list(range(40)), SamplingParams())
    cached.num_computed = cached.num_cached_prompt = 16  # admitted with a 16-token cache hit
    decoding = Req("b", list(range(8)), SamplingParams(), output_ids=[1, 2])
    decoding.num_computed = 9  # computes its last output token and samples
    counters = StepCounters()
    counters.count(ScheduledBatch([cached, decoding], [16, 1]))
    assert counters == StepCounters(
        prompt_tokens=16, generated_tokens=1, prefix_queried=40, prefix_hit=16
    )
    cached.num_computed = 32  # its last chunk: the rest of the prompt, then a sample
    counters.count(ScheduledBatch([cached], [8]))
    assert counters == StepCounters(
        prompt_tokens=24, generated_tokens=2, prefix_queried=40, prefix_hit=16
    )


def test_a_negative_interval_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="log_stats_interval_s must be >= 0"):
        NodeSettings(role="decode", model="/m", log_stats_interval_s=-1)
    yaml_text = "model: {path: /m}\ndecode: [{name: d0, port: 1, log_stats_interval_s: -1}]\n"
    with pytest.raises(ConfigError, match=r"decode\.0\.log_stats_interval_s: must be >= 0"):
        parse_cluster(yaml.safe_load(yaml_text))
    cluster = parse_cluster(yaml.safe_load(yaml_text.replace("-1", "0.5")))
    assert cluster.node_settings("d0").log_stats_interval_s == 0.5


def test_a_finished_request_logs_its_numbers_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(client: SchedulerClient, _: StandInScheduler) -> None:
        run = JobRun(client, jobs({}), timeout_s=10)
        await run.start()
        await run.rest()
        await run.close()

    with caplog.at_level(logging.DEBUG, logger="node.jobs"):
        run_with(tmp_path, body)
    lines = [r.getMessage() for r in caplog.records if r.name == "node.jobs"]
    assert len(lines) == 1 and caplog.records[-1].levelno == logging.DEBUG
    found = re.fullmatch(
        r"\[r-0\] finished: prompt_tokens=2 cached_tokens=0 output_tokens=2 "
        r"finish_reason=length ttft_s=(\d+\.\d{3}) e2e_s=(\d+\.\d{3})",
        lines[0],
    )
    assert found, lines[0]
    assert float(found.group(1)) <= float(found.group(2))


# ---- a real node ------------------------------------------------------------------------------


def stats_lines(log: Path) -> list[dict[str, str]]:
    text = log.read_text(errors="replace")
    return [fields(m) for m in re.findall(r"(stats role=\S+(?: \S+=\S+)*)$", text, re.M)]


def test_a_node_at_log_level_info_logs_its_stats(make_tiny, tmp_path: Path) -> None:
    port = free_port()
    config = {
        "model": {"path": str(make_tiny("llama"))},
        "served_model_name": "tiny",
        "engine": {"dtype": "float32", "page_size": 16, "max_total_tokens": 2048, "threads": 1},
        "transfer": {"backend": "none"},
        "decode": [{"name": "d0", "port": port, "log_level": "info", "log_stats_interval_s": 0.2}],
    }
    path, log = tmp_path / "cluster.yaml", tmp_path / "d0.log"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "cluster.cli", "decode", "--config", str(path)]
    # NOTE: a session of its own, so that stopping it reaches its scheduler process too
    proc = subprocess.Popen(
        [*command, "--name", "d0"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the node exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200
        return False

    try:
        wait_until(healthy, NODE_START_TIMEOUT_S, "the node")
        prompt = "The quick brown fox jumps over the lazy dog. " * 4  # whole cached pages
        for _ in range(2):  # the second reads the first's prompt from the prefix cache
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60, trust_env=False)
            assert r.status_code == 200, r.text

        def generated() -> list[dict[str, str]]:
            lines = stats_lines(log)
            return lines if any(float(s["gen_tok_s"]) > 0 for s in lines) else []

        lines = wait_until(generated, LINE_TIMEOUT_S, "a stats line with gen_tok_s > 0")
        assert all(s["role"] == "decode" for s in lines)
        assert any(float(s["prompt_tok_s"]) > 0 for s in lines)
        assert set(lines[0]) >= {"running", "waiting", "held", "kv_usage", "prefix_hit"}
        wait_until(
            lambda: any(s["prefix_hit"] != "0.0%" for s in stats_lines(log)),
            LINE_TIMEOUT_S,
            "a stats line with a prefix cache hit",
        )
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
