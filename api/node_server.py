"""Running a node: the scheduler in its own process, the HTTP API in this one.

`serve_node` spawns the role's scheduler process, waits until its model is loaded, and serves
the HTTP API with uvicorn (uvloop). If the scheduler process dies, the HTTP process exits too, so
a supervisor sees the node go down instead of a node that answers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette

from api.ipc import SchedulerClient
from api.node_app import NodeContext, create_node_app
from api.settings import NodeSettings

log = logging.getLogger(__name__)

SchedulerMain = Callable[[NodeSettings, str, str, Any], None]
READY_TIMEOUT_S = 900.0


def start_scheduler(settings: NodeSettings, main: SchedulerMain, ipc_dir: str) -> tuple:
    """Spawn the scheduler process; return (process, its ready message, requests, outputs)."""
    requests_addr, outputs_addr = f"ipc://{ipc_dir}/requests", f"ipc://{ipc_dir}/outputs"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=main,
        args=(settings, requests_addr, outputs_addr, child),
        name=f"{settings.name}-scheduler",
    )
    proc.start()
    child.close()
    if not parent.poll(READY_TIMEOUT_S):
        proc.kill()
        raise RuntimeError(f"scheduler of {settings.name} did not start in {READY_TIMEOUT_S:.0f}s")
    try:
        ready = parent.recv()
    except EOFError:
        proc.join(5)
        raise RuntimeError(f"scheduler of {settings.name} exited with {proc.exitcode}") from None
    if "error" in ready:
        proc.join(5)
        raise RuntimeError(f"scheduler of {settings.name} failed to start: {ready['error']}")
    return proc, ready, requests_addr, outputs_addr


async def watch_process(proc: Any) -> None:
    while proc.is_alive():
        await asyncio.sleep(1.0)
    log.error("scheduler process exited with %s; stopping the node", proc.exitcode)
    os.kill(os.getpid(), signal.SIGTERM)


def node_app(
    settings: NodeSettings, tokenizer: Any, proc: Any, ready: dict, addrs: tuple
) -> Starlette:
    client = SchedulerClient(*addrs)
    ctx = NodeContext(
        settings=settings,
        client=client,
        tokenizer=tokenizer,
        model_name=settings.model_name,
        max_model_len=int(ready["max_model_len"]),
        alive=proc.is_alive,
    )
    app = create_node_app(ctx)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        client.start()
        watcher = asyncio.create_task(watch_process(proc))
        yield
        watcher.cancel()
        await client.stop()
        # NOTE: here, not only in serve_node's finally: uvicorn re-raises SIGTERM after its
        # graceful shutdown, so code after uvicorn.run may never run.
        stop_process(proc)

    app.router.lifespan_context = lifespan
    return app


def serve_node(settings: NodeSettings, main: SchedulerMain, tokenizer: Any) -> None:
    """Run one node until it is stopped (SIGINT/SIGTERM)."""
    ipc_dir = tempfile.mkdtemp(prefix="pdserve-")
    proc = None
    try:
        proc, ready, *addrs = start_scheduler(settings, main, ipc_dir)
        app = node_app(settings, tokenizer, proc, ready, tuple(addrs))
        log.warning(
            "%s node %s serving on http://%s:%d",
            settings.role,
            settings.name,
            settings.host,
            settings.port,
        )
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    finally:
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(ipc_dir, ignore_errors=True)


def stop_process(proc: Any, grace_s: float = 10.0) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(grace_s)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def scheduler_process(settings: NodeSettings, conn: Any, build: Callable[[], Any]) -> None:
    """Body of a scheduler process: build the loop (reporting failures), say ready, run it."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {settings.name}-scheduler %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the HTTP process decides when to stop
    try:
        loop, info = build()
    except Exception as exc:
        log.exception("scheduler start failed")
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None
    conn.send({"ok": True, **info})
    conn.close()
    signal.signal(signal.SIGTERM, lambda *_: loop.stop_event.set())
    try:
        loop.run()
    finally:
        loop.close()
