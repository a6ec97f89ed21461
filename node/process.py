"""The scheduler process: started by the node's HTTP process, it loads the engine, builds the
role's loop and runs it until the HTTP process stops it (`stop_process`: STOP_SIGNAL).

Once running it ignores SIGTERM and SIGINT: the launcher (and a terminal's Ctrl-C) signal the
node's whole process group, and the scheduler must keep serving while the HTTP process drains.

`start_scheduler` (HTTP side) starts it and waits for its ready message; `scheduler_main` is its
body, the same for every role: the role is the loop class it is given.

A CPU node's scheduler is forked: it starts with the HTTP process's imports (torch, transformers)
and tokenizer already loaded, which halved a 1P1D cluster's start here (16.5 s to 8.8 s until
its first answer). A CUDA node's is spawned, so that nothing the HTTP process might have done
with CUDA can reach a child that uses it; its tokenizer goes along pickled.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from transformers import PreTrainedTokenizerFast

from engine.engine import Engine
from engine.parent_death import die_with_parent
from node.channel import SchedulerChannel
from node.kv_link import rank_setup
from node.loop import NodeLoop
from node.settings import NodeSettings
from node.stats_log import StatsLog

MOONCAKE_LOG_LEVELS = {"debug": "INFO", "info": "WARNING", "warning": "WARNING", "error": "ERROR"}
log = logging.getLogger(__name__)

READY_TIMEOUT_S = 900.0
STOP_SIGNAL = signal.SIGUSR1  # the HTTP process's "stop now" (SIGTERM is the node's drain)


class SchedulerFailed(RuntimeError):
    """The scheduler process could not start; what went wrong is in its own log above."""


@dataclass(frozen=True)
class Scheduler:
    """A started scheduler process, as the HTTP process holds it."""

    process: BaseProcess
    ready: dict[str, Any]  # what the loop reported once built (NodeLoop.ready_info)
    requests_addr: str
    outputs_addr: str


def how_it_ended(code: int | None) -> str:
    """A scheduler's exit, in words: a SIGKILL nobody here sent is most often the kernel's OOM
    killer, so it says where to look."""
    if code is None or code >= 0:
        return f"exited with {code}"
    name = signal.Signals(-code).name
    if -code == signal.SIGKILL:
        return f"was killed by {name} (out of memory? the kernel log, dmesg, says)"
    return f"was killed by {name}"


def start_scheduler(
    settings: NodeSettings,
    loop_cls: type[NodeLoop],
    ipc_name: str,
    tokenizer: PreTrainedTokenizerFast | None = None,
    method: str | None = None,
) -> Scheduler:
    """Start the scheduler process and wait until its model is loaded. `tokenizer`, the HTTP
    process's own, goes along (pickled where the process is spawned): a scheduler then skips
    loading it again (seconds). `method`: "fork" or "spawn"; by default `start_method`.

    The channel's sockets are in Linux's abstract namespace (`ipc://@ipc_name/...`): no file
    to leave behind when the node is killed."""
    requests_addr, outputs_addr = (f"ipc://@{ipc_name}/{end}" for end in ("requests", "outputs"))
    ctx = mp.get_context(method or start_method(settings))
    parent, child = ctx.Pipe(duplex=False)

    def start(handed: PreTrainedTokenizerFast | None) -> BaseProcess:
        proc = ctx.Process(
            target=scheduler_main,
            args=(settings, loop_cls, requests_addr, outputs_addr, child, handed),
            name=f"{settings.name}-scheduler",
        )
        proc.start()
        return proc

    try:
        proc = start(tokenizer)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:  # before the child starts
        log.info("the tokenizer does not pickle (%s); the scheduler loads its own", exc)
        proc = start(None)
    child.close()
    if not parent.poll(READY_TIMEOUT_S):
        proc.kill()
        raise SchedulerFailed(
            f"scheduler of {settings.name} did not start in {READY_TIMEOUT_S:.0f}s"
        )
    try:
        ready = parent.recv()
    except EOFError:
        proc.join(5)
        raise SchedulerFailed(
            f"scheduler of {settings.name} {how_it_ended(proc.exitcode)}"
        ) from None
    if "error" in ready:
        proc.join(5)
        if ready.get("setting"):
            raise ValueError(ready["error"])
        raise SchedulerFailed(f"scheduler of {settings.name} failed to start: {ready['error']}")
    return Scheduler(proc, ready, requests_addr, outputs_addr)


def start_method(settings: NodeSettings) -> str:
    """How a node's scheduler process starts: forked on CPU, spawned where it uses CUDA."""
    return "fork" if settings.engine.device == "cpu" else "spawn"


def stop_process(proc: BaseProcess, grace_s: float = 10.0) -> None:
    """Stop a scheduler process: STOP_SIGNAL (it ignores SIGTERM), SIGKILL after `grace_s`."""
    if proc.is_alive() and proc.pid is not None:
        os.kill(proc.pid, STOP_SIGNAL)
        proc.join(grace_s)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def scheduler_main(
    settings: NodeSettings,
    loop_cls: type[NodeLoop],
    requests_addr: str,
    outputs_addr: str,
    conn: Connection,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> None:
    """Body of a scheduler process: build the loop (reporting failures), say ready, run it."""
    die_with_parent()  # a node's HTTP process killed outright takes its scheduler along
    logging.basicConfig(
        force=True,
        level=settings.log_level.upper(),
        format=f"%(asctime)s {settings.name}-scheduler %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the HTTP process decides when to stop
    # the engine's other ranks (if any) say whose they are in their log lines
    os.environ["PDSERVE_NODE_NAME"] = settings.name
    os.environ["PDSERVE_LOG_LEVEL"] = settings.log_level
    # Mooncake's C++ log reads this when it loads (below); its INFO is a line per transfer
    os.environ.setdefault("MC_LOG_LEVEL", MOONCAKE_LOG_LEVELS[settings.log_level])
    try:
        loop = build_loop(settings, loop_cls, requests_addr, outputs_addr, tokenizer)
    except (ValueError, FileNotFoundError) as exc:
        # NOTE: a setting this machine or checkpoint cannot take (engine.device cuda without a
        # GPU): the node says it in one line and exits 2, as `pdserve` does for a bad config, so
        # the launcher does not retry it; the traceback only at log_level debug
        log.debug("scheduler start failed", exc_info=True)
        conn.send({"error": str(exc), "setting": True})
        raise SystemExit(2) from None
    except Exception as exc:
        log.exception("scheduler start failed")
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None
    # NOTE: before "ready": from then on the HTTP process may stop us, and SIGTERM is a drain
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, lambda *_: loop.stop_event.set())
    conn.send({"ok": True, **loop.ready_info()})
    conn.close()
    try:
        loop.run(StatsLog(settings.role, settings.log_stats_interval_s))
    finally:
        loop.close()


def build_loop(
    settings: NodeSettings,
    loop_cls: type[NodeLoop],
    requests_addr: str,
    outputs_addr: str,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> NodeLoop:
    """The engine over the settings' checkpoint, and the role's loop around it."""
    if settings.role != loop_cls.ROLE:
        raise TypeError(f"{loop_cls.__name__} does not run {settings.role} nodes")
    setup = rank_setup(settings)
    engine = Engine(settings.model, settings.engine, rank_setup=setup, tokenizer=tokenizer)
    try:
        return loop_cls.create(engine, SchedulerChannel(requests_addr, outputs_addr), settings)
    except BaseException:
        engine.close()
        raise
