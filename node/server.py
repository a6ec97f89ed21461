"""Running a node: the scheduler in its own process (node/process.py), the HTTP API in this one.

`serve_node(settings, loop_cls)` spawns the scheduler process with the role's loop class, waits
until its model is loaded, and serves the HTTP API with uvicorn (uvloop) until a signal drains it
(node/drain.py): then it stops the scheduler and returns, and the node exits 0. If the scheduler
process dies, the HTTP process stops at once and exits 1, so a supervisor sees the node go down
instead of a node that answers nothing. A setting the node cannot start with (one the engine
refuses on this machine) ends it at start with one line and exit code 2, which a supervisor
does not retry; any other failure at start exits 1 after the scheduler's traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from transformers import PreTrainedTokenizerFast

from engine.tokenizer import load_tokenizer
from node.app import create_node_app
from node.channel import SchedulerClient
from node.context import NodeContext
from node.drain import Drain
from node.loop import NodeLoop
from node.process import (
    Scheduler,
    SchedulerFailed,
    how_it_ended,
    start_scheduler,
    stop_process,
)
from node.settings import NodeSettings

log = logging.getLogger(__name__)

# after the drain, what uvicorn still waits for: responses whose last bytes are being written
CLOSE_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 1.0


class NodeServer(uvicorn.Server):
    """uvicorn's server, stopped by a drain: the first SIGTERM or SIGINT starts it, a second one
    cuts what is in flight at once, a third stops without waiting. The scheduler process dying
    stops it at once."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, client: SchedulerClient, proc: BaseProcess
    ) -> None:
        super().__init__(config)
        self.drain, self.client, self.proc = drain, client, proc
        self.signals = 0
        self.scheduler_died = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(self._watch_scheduler())
        try:
            await super().serve(sockets)
        finally:
            watcher.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: not uvicorn's own: it stops at once, and raises the signal again once stopped,
        # so the process would die by it instead of exiting 0 after its drain
        self.signals += 1
        if self._loop is None or self.signals > 2:
            self.should_exit = self.force_exit = True
        elif self.signals == 1:
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            self._loop.call_soon_threadsafe(self.drain.hurry)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        try:
            await self.drain.run(self.client)
        except Exception:  # NOTE: stop anyway: the signal asked for it
            log.exception("the drain failed; stopping")
        finally:
            self.should_exit = True

    async def _watch_scheduler(self) -> None:
        while self.proc.is_alive():
            await asyncio.sleep(WATCH_INTERVAL_S)
        log.error("scheduler process %s; stopping the node", how_it_ended(self.proc.exitcode))
        self.scheduler_died = True
        self.should_exit = True


def serve_node(settings: NodeSettings, loop_cls: type[NodeLoop]) -> None:
    """Run one node until it is drained (SIGINT/SIGTERM); SystemExit(1) if its scheduler fails
    to start or dies, ValueError for a setting it cannot start with (`pdserve` exits 2)."""
    if settings.role != loop_cls.ROLE:
        raise ValueError(f"settings for a {settings.role} node given to {loop_cls.__name__}")
    logging.basicConfig(  # NOTE: force: the node's log_level, not the `pdserve` command's
        force=True,
        level=settings.log_level.upper(),
        format=f"%(asctime)s {settings.name} %(levelname)s %(name)s: %(message)s",
    )
    tokenizer = load_tokenizer(settings.model)
    ipc_name = f"pdserve-{settings.name}-{os.getpid()}-{secrets.token_hex(4)}"
    scheduler = None
    try:
        try:
            scheduler = start_scheduler(settings, loop_cls, ipc_name, tokenizer)
        except SchedulerFailed as exc:  # NOTE: its traceback is the scheduler's, logged above
            raise SystemExit(str(exc)) from None
        server = node_server(settings, tokenizer, scheduler)
        log.warning(
            "%s node %s serving on http://%s:%d",
            settings.role,
            settings.name,
            settings.host,
            settings.port,
        )
        server.run()
        if server.scheduler_died:
            raise SystemExit(f"{settings.name}: the scheduler process exited; node stopped")
    finally:
        if scheduler is not None:
            stop_process(scheduler.process)


def node_server(
    settings: NodeSettings, tokenizer: PreTrainedTokenizerFast, scheduler: Scheduler
) -> NodeServer:
    client = SchedulerClient(scheduler.requests_addr, scheduler.outputs_addr)
    drain = Drain(settings.drain_timeout_s)
    app = node_app(settings, tokenizer, scheduler, client, drain)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=CLOSE_TIMEOUT_S,
    )
    return NodeServer(config, drain, client, scheduler.process)


def node_app(
    settings: NodeSettings,
    tokenizer: PreTrainedTokenizerFast,
    scheduler: Scheduler,
    client: SchedulerClient,
    drain: Drain,
) -> Starlette:
    ctx = NodeContext(
        settings=settings,
        client=client,
        tokenizer=tokenizer,
        max_model_len=int(scheduler.ready["max_model_len"]),
        alive=scheduler.process.is_alive,
        drain=drain,
    )
    app = create_node_app(ctx)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        client.start()
        yield
        await client.stop()

    app.router.lifespan_context = lifespan
    return app
