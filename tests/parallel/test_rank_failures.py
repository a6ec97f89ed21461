"""A rank group that loses a rank fails in bounded time, and bad parallel settings are refused
before anything starts, each error naming the fix."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from engine.config import ModelConfig
from engine.llm import LLM
from engine.options import EngineOptions
from engine.parallel.check import check_parallel
from engine.parallel.ranks import RankFailure
from engine.parallel.worker import join_watching
from engine.sampling import SamplingParams

TIMEOUT_S = 4.0
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def two_ranks(path) -> LLM:
    return LLM(str(path), tp_size=2, dist_timeout_s=TIMEOUT_S, max_total_tokens=1024)


def test_a_killed_rank_fails_the_engine_at_once(make_tiny) -> None:
    llm = two_ranks(make_tiny("llama"))
    try:
        assert llm.generate([[1, 2, 3]], PARAMS)[0].token_ids
        (rank1,) = llm.engine.group.describe()
        os.kill(rank1["pid"], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1"):
            while True:  # idle: the watch notices without any step
                llm.engine.check_health()
                time.sleep(0.05)
        assert time.monotonic() - start < TIMEOUT_S
        with pytest.raises(RankFailure):
            llm.generate([[1, 2, 3]], PARAMS)
    finally:
        llm.close()


def test_a_hung_rank_fails_a_step_within_the_timeout(make_tiny) -> None:
    llm = two_ranks(make_tiny("llama"))
    (rank1,) = llm.engine.group.describe()
    try:
        os.kill(rank1["pid"], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="a step failed"):
            llm.generate([[1, 2, 3]], PARAMS)
        assert time.monotonic() - start < TIMEOUT_S + 5
    finally:
        llm.close()  # kills the stopped rank rather than waiting for it
    assert time.monotonic() - start < TIMEOUT_S + 10


def test_idle_ranks_stay_inside_the_timeout(make_tiny) -> None:
    """The heartbeat keeps an idle group alive past dist_timeout_s."""
    with two_ranks(make_tiny("llama")) as llm:
        time.sleep(TIMEOUT_S * 1.5)
        llm.engine.check_health()
        assert llm.generate([[4, 5, 6]], PARAMS)[0].token_ids


@pytest.mark.parametrize(
    ("arch", "options", "message"),
    [
        ("llama", {"tp_size": 3}, r"tp_size 3 does not divide the model's 4 attention heads "
         r"\(set tp_size to one of: 1, 2, 4\)"),
        ("llama", {"tp_size": 8}, "does not divide the model's 4 attention heads"),
        ("deepseek_v3", {"tp_size": 2, "ep_size": 2, "_experts": 5}, r"ep_size 2 does not "
         r"divide the model's 5 routed experts \(use ep_size 1, or tp_size = ep_size among: "
         r"1, 5\)"),
        ("llama", {"tp_size": 2, "ep_size": 2}, "ep_size 2 needs a MoE model"),
    ],
)  # fmt: skip
def test_splits_that_do_not_divide_are_refused(make_tiny, arch, options, message) -> None:
    experts = options.pop("_experts", None)
    kw = {"config_overrides": {"n_routed_experts": experts, "n_group": 1, "topk_group": 1}}
    path = make_tiny(arch, layers=3, **(kw if experts else {}))
    with pytest.raises(ValueError, match=message):
        check_parallel(ModelConfig.load(path), EngineOptions(**options))
    with pytest.raises(ValueError, match=message):
        LLM(str(path), **options)  # refused before any rank starts


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tp_size": 2, "ep_size": 3}, "ep_size must be 1 or equal tp_size"),
        ({"tp_size": 3, "nnodes": 2}, "must be a multiple of nnodes"),
        ({"tp_size": 2, "nnodes": 2}, "needs dist_init_addr"),
        ({"tp_size": 2, "nnodes": 2, "node_rank": 2, "dist_init_addr": "h:1"}, "node_rank"),
        ({"dist_init_addr": "nohostport"}, "host:port"),
    ],
)
def test_bad_parallel_options_are_refused(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineOptions(**options)


def kill_first_rank_child(stop: threading.Event) -> None:
    """kill -9 this process's first spawned child (a rank) as soon as it exists."""
    me = str(os.getpid())
    while not stop.is_set():
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = stat.read_text().rsplit(")", 1)[1].split()[1]
                cmdline = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if ppid == me and b"spawn_main" in cmdline:
                time.sleep(0.5)  # let it get going
                os.kill(int(stat.parent.name), signal.SIGKILL)
                return
        time.sleep(0.02)


def test_a_rank_that_dies_while_the_collectives_form_fails_the_join_at_once() -> None:
    """Past the rendezvous, rank 0 builds the group's collectives, which need every rank: a
    local rank that dies meanwhile is said at once, not after the collectives' timeout."""
    rank = mp.get_context("spawn").Process(target=time.sleep, args=(60,), name="rank1")
    rank.start()
    never = threading.Event()  # a join the dead rank can no longer complete
    threading.Timer(0.3, rank.kill).start()
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="rank1 exited with code -9 while starting"):
            join_watching(never.wait, EngineOptions(tp_size=2, dist_timeout_s=30), [rank])
    finally:
        never.set()
    assert time.monotonic() - start < 10


def test_a_rank_that_dies_while_starting_fails_the_start_at_once(make_tiny) -> None:
    """Rank 0 says so at once instead of waiting out the join or load timeouts."""
    stop = threading.Event()
    killer = threading.Thread(target=kill_first_rank_child, args=(stop,), daemon=True)
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises((RankFailure, RuntimeError), match="exited with code -9"):
            LLM(str(make_tiny("llama")), tp_size=2, dist_timeout_s=30, max_total_tokens=1024)
    finally:
        stop.set()
    assert time.monotonic() - start < 20
