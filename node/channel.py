"""The ZMQ channel between a node's HTTP process and its scheduler process.

    HTTP process (asyncio)                     scheduler process (sync loop)
    SchedulerClient.push  --requests-->  PULL  SchedulerChannel
    SchedulerClient.pull  <--outputs---  PUSH  SchedulerChannel

The HTTP side binds both ipc:// endpoints (abstract: no files); the scheduler connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

import zmq
import zmq.asyncio

from node.messages import (
    CODEC,
    AbortRequest,
    ControlReply,
    ControlRequest,
    NodeMessage,
    TokenOutput,
)

log = logging.getLogger(__name__)


class SchedulerChannel:
    """The scheduler process's end: receive requests, send outputs."""

    def __init__(self, requests_addr: str, outputs_addr: str) -> None:
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.connect(requests_addr)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 1000)
        self._push.connect(outputs_addr)

    def receive(self, timeout_ms: int) -> list[NodeMessage]:
        """Every message waiting now; blocks up to timeout_ms for the first one."""
        if timeout_ms > 0 and not self._pull.poll(timeout_ms):
            return []
        messages = []
        while True:
            try:
                messages.append(CODEC.decode(self._pull.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return messages

    def send(self, msg: NodeMessage) -> None:
        self._push.send(CODEC.encode(msg))

    def close(self) -> None:
        self._pull.close(0)
        self._push.close()
        self._ctx.term()


class SchedulerClient:
    """The HTTP process's end: submit requests, get each request's outputs on its own queue."""

    def __init__(self, requests_addr: str, outputs_addr: str) -> None:
        self._ctx = zmq.asyncio.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.bind(requests_addr)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(outputs_addr)
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._calls: dict[int, asyncio.Future[ControlReply]] = {}
        self._call_ids = itertools.count()
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read_outputs())

    async def _read_outputs(self) -> None:
        while True:
            try:
                msg = CODEC.decode(await self._pull.recv())
            except ValueError:  # NOTE: never end the reader: every request would wait forever
                log.exception("dropped an undecodable message from the scheduler")
                continue
            if isinstance(msg, TokenOutput):
                queue = self._queues.get(msg.rid)
                if queue is not None:
                    queue.put_nowait(msg)
            elif isinstance(msg, ControlReply):
                future = self._calls.pop(msg.call_id, None)
                if future is not None and not future.done():
                    future.set_result(msg)

    def open(
        self, rid: str, queue: asyncio.Queue[TokenOutput] | None = None
    ) -> asyncio.Queue[TokenOutput]:
        """Route rid's outputs to `queue` (a new one by default; several rids may share one)."""
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in flight (send a unique rid)")
        self._queues[rid] = queue if queue is not None else asyncio.Queue()
        return self._queues[rid]

    def close(self, rid: str) -> None:
        self._queues.pop(rid, None)

    def open_rids(self) -> list[str]:
        return list(self._queues)

    async def send(self, msg: NodeMessage) -> None:
        await self._push.send(CODEC.encode(msg))

    async def abort(self, rid: str) -> None:
        self.close(rid)
        await self.send(AbortRequest(rid))

    async def call(self, op: str, timeout_s: float = 10.0) -> ControlReply:
        call_id = next(self._call_ids)
        future: asyncio.Future[ControlReply] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        await self.send(ControlRequest(call_id, op))
        try:
            async with asyncio.timeout(timeout_s):  # NOTE: wait_for can swallow a cancel (3.11)
                return await future
        finally:
            self._calls.pop(call_id, None)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._push.close(0)
        self._pull.close(0)
        self._ctx.term()
