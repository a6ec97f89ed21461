"""Running a node: the scheduler in its own process (node/process.py), the HTTP API in this one.

`serve_node(settings, loop_cls)` spawns the scheduler process with the role's loop class, waits
until its model is loaded, and serves the HTTP API with uvicorn (uvloop). If the scheduler
process dies, the HTTP process exits too, so a supervisor sees the node go down instead of a
node that answers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from multiprocessing.process import BaseProcess

import uvicorn
from starlette.applications import Starlette
from transformers import PreTrainedTokenizerFast

from engine.tokenizer import load_tokenizer
from node.app import create_node_app
from node.channel import SchedulerClient
from node.context import NodeContext
from node.loop import NodeLoop
from node.process import Scheduler, start_scheduler, stop_process
from node.settings import NodeSettings

log = logging.getLogger(__name__)


def serve_node(settings: NodeSettings, loop_cls: type[NodeLoop]) -> None:
    """Run one node until it is stopped (SIGINT/SIGTERM)."""
    if settings.role != loop_cls.ROLE:
        raise ValueError(f"settings for a {settings.role} node given to {loop_cls.__name__}")
    tokenizer = load_tokenizer(settings.model)
    ipc_dir = tempfile.mkdtemp(prefix="pdserve-")
    scheduler = None
    try:
        scheduler = start_scheduler(settings, loop_cls, ipc_dir)
        app = node_app(settings, tokenizer, scheduler)
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
        if scheduler is not None:
            stop_process(scheduler.process)
        shutil.rmtree(ipc_dir, ignore_errors=True)


def node_app(
    settings: NodeSettings, tokenizer: PreTrainedTokenizerFast, scheduler: Scheduler
) -> Starlette:
    client = SchedulerClient(scheduler.requests_addr, scheduler.outputs_addr)
    proc = scheduler.process
    ctx = NodeContext(
        settings=settings,
        client=client,
        tokenizer=tokenizer,
        max_model_len=int(scheduler.ready["max_model_len"]),
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


async def watch_process(proc: BaseProcess) -> None:
    while proc.is_alive():
        await asyncio.sleep(1.0)
    log.error("scheduler process exited with %s; stopping the node", proc.exitcode)
    os.kill(os.getpid(), signal.SIGTERM)
