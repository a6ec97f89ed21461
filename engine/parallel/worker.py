"""Starting a rank group's processes: rank 0's host starts its other ranks (`start_group`), a
host with node_rank > 0 starts all of its own (`serve_ranks`), and each of those runs
`rank_main`: load this rank's slice of the model, then run the steps rank 0 broadcasts.

A `RankSetup` ("module:function", payload) is called in every rank once its model is loaded,
as `function(runner, group, payload)`: how a node starts a rank's transfer engine without the
engine knowing of nodes. Its result is kept for the life of the rank."""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.options import EngineOptions
from engine.parallel.ranks import RankGroup
from engine.parent_death import die_with_parent
from engine.runner import ModelRunner, use_device

log = logging.getLogger(__name__)
REMOTE_RANKS_REMINDER_S = 5.0  # rank 0 says whom it waits for once this has passed

RankSetup = tuple[str, Any]  # ("module:function", payload)


def local_ranks(options: EngineOptions) -> range:
    """The ranks this host runs (`nnodes` hosts share the group evenly, in node_rank order)."""
    per_host = options.tp_size // options.nnodes
    return range(options.node_rank * per_host, (options.node_rank + 1) * per_host)


def rank_device(options: EngineOptions, rank: int) -> str:
    """The device `rank` runs on: on CUDA one GPU per rank of this host, counting from
    engine.device's index (cuda: rank 0 on cuda:0, rank 1 on cuda:1; cuda:2: cuda:2, cuda:3),
    as SGLang's base GPU id; on CPU every rank on cpu."""
    device = torch.device(options.device)
    if device.type != "cuda":
        return options.device
    return f"cuda:{(device.index or 0) + rank - local_ranks(options).start}"


def threads_per_rank(options: EngineOptions) -> int:
    """A rank's share of the host's cores (or of `threads`)."""
    total = options.threads or os.cpu_count() or 1
    return max(1, total // len(local_ranks(options)))


def start_group(
    model_path: str, options: EngineOptions, setup: RankSetup | None = None
) -> RankGroup:
    """Rank 0: host the rendezvous (dist_init_addr, or a free loopback port), start this host's
    other ranks, and join the group."""
    host, port = (options.dist_init_addr or "127.0.0.1:0").rsplit(":", 1)
    store = dist.TCPStore(
        host,
        int(port),
        options.tp_size,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=options.dist_timeout_s),
    )
    init_addr = f"{host}:{store.port}"
    children = spawn_ranks(model_path, options, init_addr, local_ranks(options)[1:], setup)
    try:
        wait_for_ranks(store, options, children)
        group = join_watching(lambda: RankGroup(options, 0, store), options, children)
    except BaseException:
        for proc in children:
            proc.kill()
        raise
    group.children = children
    return group


def wait_for_ranks(store: dist.Store, options: EngineOptions, children: list[BaseProcess]) -> None:
    """Until every rank has reached the rendezvous; a local rank that exits first, or a group
    incomplete after dist_timeout_s, is an error (instead of a long wait inside torch)."""
    keys = [f"joined/{rank}" for rank in range(1, options.tp_size)]
    start = time.monotonic()
    deadline, remind = start + options.dist_timeout_s, start + REMOTE_RANKS_REMINDER_S
    while not store.check(keys):
        _check_alive(children)
        if options.nnodes > 1 and time.monotonic() > remind:
            remind = float("inf")  # once: a long wait for other hosts must not be silent
            missing = [k.split("/")[1] for k in keys if not store.check([k])]
            log.warning(
                "waiting up to %gs for ranks %s from the other hosts (each starts the same "
                "node with --nnodes %d --node-rank N --dist-init-addr %s)",
                options.dist_timeout_s, ",".join(missing), options.nnodes,
                options.dist_init_addr,
            )  # fmt: skip
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the rank group did not gather in {options.dist_timeout_s:.0f}s (ranks on other "
                f"hosts must start with nnodes={options.nnodes}, dist_init_addr=this host:port)"
            )
        time.sleep(0.05)


def join_watching(
    join: Callable[[], RankGroup], options: EngineOptions, children: list[BaseProcess]
) -> RankGroup:
    """``join()`` (building the group's collectives: every rank must take part) while watching
    the local ranks: one that exits meanwhile is an error at once, not after the collectives'
    own timeout. The abandoned join ends inside torch at that timeout."""
    done: Future[RankGroup] = Future()

    def run() -> None:
        try:
            done.set_result(join())
        except BaseException as e:  # handed to the caller
            done.set_exception(e)

    threading.Thread(target=run, name="rank-join", daemon=True).start()
    deadline = time.monotonic() + options.dist_timeout_s + 5
    while True:
        try:
            return done.result(timeout=0.05)
        except FutureTimeout:
            pass
        except Exception:
            _check_alive(children)  # a rank that died is the reason, if one did
            raise
        _check_alive(children)
        if time.monotonic() > deadline:  # torch's own timeout should have ended it before
            raise RuntimeError(
                f"the rank group's collectives did not form in {options.dist_timeout_s:.0f}s"
            )


def _check_alive(children: list[BaseProcess]) -> None:
    for proc in children:
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.exitcode} while starting")


def spawn_ranks(
    model_path: str,
    options: EngineOptions,
    init_addr: str,
    ranks: range,
    setup: RankSetup | None = None,
) -> list[BaseProcess]:
    ctx = mp.get_context("spawn")
    procs = []
    for rank in ranks:
        proc = ctx.Process(
            target=rank_main,
            args=(model_path, options, rank, init_addr, setup),
            daemon=True,
            name=f"rank{rank}",
        )
        proc.start()
        procs.append(proc)
    return procs


def serve_ranks(model_path: str, options: EngineOptions, setup: RankSetup | None = None) -> int:
    """A host with node_rank > 0: run its ranks until they end; returns the exit code."""
    if not options.dist_init_addr:
        raise ValueError("nnodes > 1 needs dist_init_addr (rank 0's host:port)")
    addr = options.dist_init_addr
    procs = spawn_ranks(model_path, options, addr, local_ranks(options), setup)
    codes = []
    for proc in procs:
        proc.join()
        codes.append(proc.exitcode)
    return 0 if all(code == 0 for code in codes) else 1


def rank_main(
    model_path: str,
    options: EngineOptions,
    rank: int,
    init_addr: str,
    setup: RankSetup | None = None,
) -> None:
    """Body of a rank other than 0."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the group stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a node's SIGTERM is its drain
    name = f"{os.environ.get('PDSERVE_NODE_NAME', '')}-rank{rank}".lstrip("-")
    logging.basicConfig(
        level=os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
    try:
        follow(model_path, options, rank, init_addr, setup)
    except Exception as exc:  # said once; the exit code tells rank 0
        log.error("rank %d stops: %s: %s", rank, type(exc).__name__, exc)
        raise SystemExit(1) from None


def follow(
    model_path: str,
    options: EngineOptions,
    rank: int,
    init_addr: str,
    setup: RankSetup | None = None,
) -> None:
    """Join the group, load this rank's slice, run every step rank 0 broadcasts until it says
    stop (a failed or timed-out broadcast raises)."""
    torch.set_num_threads(threads_per_rank(options))
    options = replace(options, device=rank_device(options, rank))
    use_device(torch.device(options.device))
    host, port = init_addr.rsplit(":", 1)
    timeout = timedelta(seconds=options.dist_timeout_s)
    store = dist.TCPStore(host, int(port), options.tp_size, is_master=False, timeout=timeout)
    store.set(f"joined/{rank}", "1")
    group = RankGroup(options, rank, store)
    runner = ModelRunner(
        model_path, options, ModelConfig.load(model_path), frozenset(), group=group
    )
    kept = run_setup(setup, runner, group)  # noqa: F841 - alive as long as the rank
    with torch.inference_mode():
        while (data := group.receive()) is not None:
            runner.follow(data)
    group.close()


def run_setup(setup: RankSetup | None, runner: ModelRunner, group: RankGroup) -> Any:
    if setup is None:
        return None
    target, payload = setup
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(runner, group, payload)
