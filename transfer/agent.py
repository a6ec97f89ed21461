"""A rank's transfer engine, driven from rank 0: the other ranks of a tensor-parallel node each
own a pool (in their own process) and an engine registered over it; rank 0's sender writes
through them as if they were local engines.

    rank r:  agent = RankAgent(config, buffers)        # engine + a ZMQ server on config.host
             publish(agent.address, agent.endpoint)    # e.g. through the rank group's store
    rank 0:  backend = RemoteBackend(address, name)    # a TransferBackend; calls go to rank r

Calls are msgpack messages (nothing pickled); a submit is answered once its batch is done, so
`wait` is bounded by its deadline on rank 0 whatever happens at rank r.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import msgpack
import numpy as np
import zmq

from .base import Endpoint, TransferBackend, TransferError
from .buffers import KVBuffer, MemoryRegion, regions_for
from .config import TransferConfig
from .descriptors import DescriptorBatch
from .loop import ControlLoop
from .registry import create_backend

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0
AGENT_THREADS = 8


def _pack(*values: Any) -> bytes:
    return msgpack.packb(list(values), use_bin_type=True)


class RankAgent:
    """Serves one rank's engine to rank 0: connect, disconnect, abandon, submit (answered when
    done)."""

    def __init__(self, config: TransferConfig, buffers: Sequence[KVBuffer]) -> None:
        self.backend = create_backend(config)
        self.backend.register(regions_for(buffers))
        self.endpoint = self.backend.endpoint()
        self._pool = ThreadPoolExecutor(AGENT_THREADS, thread_name_prefix="kv-agent")
        self._loop = ControlLoop("kv-agent")
        self._sock = self._loop.context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{config.host}")
        self.address = f"tcp://{config.host}:{port}"
        self._loop.add_socket(self._sock, self._on_readable)
        self._loop.start()

    def _on_readable(self, sock: zmq.Socket) -> None:
        while True:
            try:
                caller, data = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            call_id, op, *args = msgpack.unpackb(data, raw=False)
            self._pool.submit(self._serve, caller, call_id, op, args)

    def _serve(self, caller: bytes, call_id: int, op: str, args: list[Any]) -> None:
        try:
            result = self._run(op, args)
            reply = _pack(call_id, "", result)
        except Exception as e:  # the caller gets the error as its answer
            reply = _pack(call_id, f"{type(e).__name__}: {e}", None)
        self._loop.post(lambda: self._sock.send_multipart([caller, reply], zmq.NOBLOCK))

    def _run(self, op: str, args: list[Any]) -> Any:
        if op == "connect":
            return self.backend.connect(Endpoint(*args))
        if op == "disconnect":
            return self.backend.disconnect(args[0])
        if op == "abandon":
            return self.backend.abandon(args[0])
        if op == "write":
            key, src, dst, lengths, deadline_in = args
            batch = DescriptorBatch(
                *(np.frombuffer(b, dtype=np.uint64) for b in (src, dst, lengths))
            )
            handle = self.backend.submit(key, batch)
            return self.backend.wait(handle, time.monotonic() + deadline_in)
        raise ValueError(f"unknown agent call {op!r}")

    def close(self) -> None:
        self._loop.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()


class RemoteBackend(TransferBackend):
    """Rank 0's handle on another rank's engine (a `RankAgent`): submit sends the batch there,
    wait waits for its answer."""

    default_batch_descriptors = 512

    def __init__(self, address: str, name: str) -> None:
        self.name = name  # type: ignore[misc] - the engine's name, per instance
        self._ids = itertools.count()
        self._pending: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._loop = ControlLoop(f"kv-rank {address}")
        self._sock = self._loop.context.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._loop.add_socket(self._sock, self._on_readable)
        self._loop.start()

    @classmethod
    def from_config(cls, config: TransferConfig) -> RemoteBackend:
        raise TypeError("a RemoteBackend is built from a rank agent's address")

    def register(self, regions: Sequence[MemoryRegion]) -> None:
        """The rank registered its own memory."""

    def endpoint(self) -> Endpoint:
        raise TypeError("a remote rank's endpoint comes from its agent")

    def connect(self, peer: Endpoint) -> str:
        future = self._call("connect", peer.backend, peer.session, peer.blob, peer.device)
        return self._result(future, time.monotonic() + CALL_TIMEOUT_S)

    def disconnect(self, peer_key: str) -> None:
        self._call("disconnect", peer_key)  # nobody waits: the rank forgets the peer soon

    def abandon(self, peer_key: str) -> None:
        self._call("abandon", peer_key)  # nobody waits: the rank's writes to it end soon

    def submit(self, peer_key: str, batch: DescriptorBatch) -> Any:
        # NOTE: the rank's own wait is bounded by the room's transfer timeout; ours by the
        # deadline `wait` gets, so a rank that never answers fails the batch in time too
        arrays = (
            np.ascontiguousarray(a, dtype=np.uint64).tobytes()
            for a in (batch.src, batch.dst, batch.lengths)
        )
        return self._call("write", peer_key, *arrays, CALL_TIMEOUT_S)

    def wait(self, handle: Any, deadline: float) -> str:
        try:
            return self._result(handle, deadline)
        except TransferError as e:
            return str(e)

    def close(self) -> None:
        self._loop.stop()
        with self._lock:
            for future in self._pending.values():
                future.set_exception(TransferError("rank connection closed"))
            self._pending.clear()

    def _call(self, op: str, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        call_id = next(self._ids)
        with self._lock:
            self._pending[call_id] = future
        data = _pack(call_id, op, *args)
        self._loop.post(lambda: self._sock.send(data, zmq.NOBLOCK))
        return future

    def _result(self, future: Future[Any], deadline: float) -> Any:
        try:
            error, result = future.result(max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise TransferError("the rank's engine did not answer in time") from None
        if error:
            raise TransferError(f"rank engine: {error}")
        return result

    def _on_readable(self, sock: zmq.Socket) -> None:
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            call_id, error, result = msgpack.unpackb(data, raw=False)
            with self._lock:
                future = self._pending.pop(call_id, None)
            if future is not None and not future.done():
                future.set_result((error, result))
