"""Rank groups: the processes of one tensor/expert-parallel model instance.

Rank 0 lives in the process that schedules (the engine's); engine/parallel/worker.py starts the
other ranks. All ranks join
one torch.distributed group (NCCL on CUDA, gloo on CPU) for the model's collectives, plus a gloo
group over which rank 0 broadcasts every step (`StepPlan` bytes) and, when idle, a heartbeat.

Nothing waits forever: every collective has the group's timeout (`dist_timeout_s`); the
heartbeat keeps idle ranks inside it; rank 0 watches its local ranks and fails (`failure`) the
moment one exits; the other ranks exit when rank 0 goes away (the broadcast fails, or the
parent-death signal on its host).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import timedelta
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist

from engine.options import EngineOptions
from engine.parallel.group import Parallel

log = logging.getLogger(__name__)

HEADER = 4096  # bytes of the first broadcast of a step; bigger plans need a second one
STOP, NOOP = -1, -2  # lengths that say "leave" and "nothing to run" instead of a step
JOIN_S = 10.0


class RankFailure(RuntimeError):
    """A rank of the group died, hung or left: the model instance cannot go on."""


class RankGroup:
    """One rank's membership: its `Parallel` handle for the layers, the step channel, and (on
    rank 0) the local rank processes it started."""

    def __init__(self, options: EngineOptions, rank: int, store: dist.Store) -> None:
        self.options, self.rank, self.store = options, rank, store
        self.size = options.tp_size
        self.timeout = timedelta(seconds=options.dist_timeout_s)
        self.failure: str | None = None
        self.children: list[BaseProcess] = []
        self._lock = threading.Lock()
        self._last_send = time.monotonic()
        self._stopped = threading.Event()
        self.compute = new_group(store, "compute", rank, self.size, self.timeout, options.device)
        self.control = new_group(store, "control", rank, self.size, self.timeout, "cpu")
        cpu = not options.device.startswith("cuda")
        self.parallel = Parallel(
            rank, self.size, self.compute, options.ep_size > 1, cpu, options.dp_attention
        )

    def agree_min(self, key: str, value: int, timeout_s: float) -> int:
        """The smallest `value` over the ranks, through the store (so ranks that take long to
        load their weights wait `timeout_s`, not the collective timeout)."""
        self.store.set(f"{key}/{self.rank}", str(value))
        keys = [f"{key}/{r}" for r in range(self.size)]
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):  # a local rank that dies loading is said at once
            gone = [f"rank {r['rank']} exited with code {r['exitcode']}"
                    for r in self.describe() if r["exitcode"] is not None]  # fmt: skip
            if gone or time.monotonic() > deadline:
                raise RankFailure(f"ranks did not all load ({', '.join(gone) or 'timed out'})")
            time.sleep(0.05)
        return min(int(self.store.get(k)) for k in keys)

    # ---- the step channel --------------------------------------------------------------------

    def send(self, data: bytes | None) -> None:
        """Rank 0: broadcast a step's bytes (None: stop)."""
        self.check()
        with self._lock:
            self._broadcast(STOP if data is None else len(data), data or b"")
            self._last_send = time.monotonic()

    def receive(self) -> bytes | None:
        """Other ranks: the next step's bytes, or None when rank 0 says stop."""
        while True:
            buf = torch.zeros(HEADER, dtype=torch.uint8)
            self.control.broadcast(buf, 0).wait()
            length = int(buf[:8].view(torch.int64).item())
            if length == STOP:
                return None
            if length == NOOP:
                continue
            first = HEADER - 8
            if length <= first:
                return buf[8 : 8 + length].numpy().tobytes()
            rest = torch.empty(length - first, dtype=torch.uint8)
            self.control.broadcast(rest, 0).wait()
            return buf[8:].numpy().tobytes() + rest.numpy().tobytes()

    def _broadcast(self, length: int, data: bytes) -> None:
        buf = torch.zeros(HEADER, dtype=torch.uint8)
        buf[:8] = torch.tensor([length], dtype=torch.int64).view(torch.uint8)
        head = data[: HEADER - 8]
        if head:
            buf[8 : 8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        self.control.broadcast(buf, 0).wait()
        if len(data) > len(head):
            rest = torch.frombuffer(bytearray(data[len(head) :]), dtype=torch.uint8)
            self.control.broadcast(rest, 0).wait()

    # ---- rank 0's watch ----------------------------------------------------------------------

    def check(self) -> None:
        """Raise RankFailure once any rank is known to be gone."""
        if self.failure is not None:
            raise RankFailure(self.failure)

    def fail(self, reason: str) -> None:
        """Mark the group failed (the first reason stays)."""
        if self.failure is None:
            self.failure = reason
            log.error("%s: the model instance stops", reason)

    def describe(self) -> list[dict[str, int | None]]:
        """Rank 0's local ranks: rank, pid and (once exited) exit code."""
        return [
            {"rank": rank, "pid": proc.pid, "exitcode": proc.exitcode}
            for rank, proc in enumerate(self.children, start=1)
        ]

    def watch(self) -> None:
        """Rank 0: a thread that notices a local rank exit and keeps idle ranks inside the
        collective timeout with a heartbeat."""
        threading.Thread(target=self._watch, name="rank-watch", daemon=True).start()

    def _watch(self) -> None:
        interval = max(0.2, min(5.0, self.options.dist_timeout_s / 4))
        while not self._stopped.wait(0.2):
            for rank, proc in enumerate(self.children, start=1):
                if not proc.is_alive():
                    self.fail(f"rank {rank} exited with code {proc.exitcode}")
            if self.failure is not None:
                return
            with self._lock:
                if time.monotonic() - self._last_send < interval:
                    continue
                try:
                    self._broadcast(NOOP, b"")
                except Exception as exc:  # any failure ends the group
                    self.fail(f"rank group heartbeat failed: {exc}")
                    return
                self._last_send = time.monotonic()

    def close(self) -> None:
        """Rank 0: tell the ranks to leave, and wait for the local ones (killing stragglers)."""
        self._stopped.set()
        if self.rank == 0 and self.failure is None:
            try:
                with self._lock:
                    self._broadcast(STOP, b"")
            except Exception:  # they are gone already
                pass
        for proc in self.children:
            if self.failure is None:  # a failed group's ranks may hang: no waiting for them
                proc.join(JOIN_S)
            if proc.is_alive():
                proc.kill()
                proc.join(JOIN_S)
        for group in (self.compute, self.control):
            with contextlib.suppress(Exception):  # a group whose peers are gone may refuse
                group.shutdown()


def new_group(
    store: dist.Store, name: str, rank: int, size: int, timeout: timedelta, device: str
) -> dist.ProcessGroup:
    """A process group of its own over `store` (NCCL for CUDA tensors, else gloo)."""
    prefixed = dist.PrefixStore(name, store)
    if device.startswith("cuda"):
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    return dist.ProcessGroupGloo(prefixed, rank, size, timeout)
