"""Prefill-side writer threads: build a room's descriptors and push them through the engine.

Each room's descriptors go out in batches under the engine's limit with up to
``max_inflight_batches`` submitted at once, so the engine's queue never drains between batches.
The metadata block goes last, after every page batch has completed. A job always waits for all
of its submitted batches before it reports, so once a room is reported done (or failed) no write
of it is still in flight.

A wait can block: an engine bounds its own waits (Mooncake: ``MC_TRANSFER_TIMEOUT``), and a
decode that hangs rather than dies keeps its writer busy that long. So no peer may hold more
than ``per_peer`` writers (its further rooms queue behind its own), and the pool starts another
thread whenever a job would otherwise wait for one, up to ``max_threads``: a hung decode delays
only its own rooms.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import TransferBackend, TransferError, TransferMetrics
from .buffers import MemoryRegion
from .descriptors import DescriptorBatch, split_batches
from .metaslots import SlotPool
from .ranks import RankKV, Slice, slice_descriptors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WritePart:
    """One source rank's writes into one destination rank, through that source's engine."""

    backend: TransferBackend
    peer_key: str
    slice: Slice
    src: RankKV
    dst: RankKV


@dataclass(frozen=True)
class TransferJob:
    """Everything a worker needs to write one room: its parts (one per source/destination rank
    pair; one in all between single-rank nodes), then the metadata through rank 0's engine."""

    room: int
    peer_key: str
    src_pages: tuple[int, ...]
    dst_pages: tuple[int, ...]
    parts: tuple[WritePart, ...]
    meta_bytes: bytes
    meta_dst: int
    deadline: float
    cancel: threading.Event


@dataclass(frozen=True)
class JobResult:
    room: int
    error: str
    metrics: TransferMetrics | None


class TransferWorkers:
    """Writer threads for rooms; results go to ``on_done`` from a worker thread."""

    def __init__(
        self,
        backend: TransferBackend,
        per_peer: int,
        max_batch: int,
        max_inflight: int,
        slot_bytes: int,
        on_done: Callable[[JobResult], None],
        max_threads: int | None = None,
    ) -> None:
        self._backend = backend
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._on_done = on_done
        self._per_peer = per_peer
        self._max_threads = max_threads or 8 * per_peer
        self._jobs: queue.SimpleQueue[TransferJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job
        self._queued = 0  # jobs handed to the queue, not yet taken
        self._writing: dict[str, int] = {}  # peer -> jobs queued or being written
        self._held: dict[str, deque[TransferJob]] = {}  # peer -> jobs over its share
        self._closed = False
        # one metadata staging slot per thread that may ever run
        self.staging = SlotPool(self._max_threads, slot_bytes)

    @property
    def staging_region(self) -> MemoryRegion:
        return MemoryRegion(self.staging.base_ptr, len(self.staging.array))

    @property
    def threads(self) -> int:
        return len(self._threads)

    def start(self) -> None:
        with self._lock:
            while len(self._threads) < self._per_peer:
                self._spawn()

    def submit(self, job: TransferJob) -> None:
        with self._lock:
            if self._writing.get(job.peer_key, 0) >= self._per_peer:
                self._held.setdefault(job.peer_key, deque()).append(job)
                return
            self._writing[job.peer_key] = self._writing.get(job.peer_key, 0) + 1
            self._hand_out(job)

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            if t.is_alive():
                t.join(timeout_s)

    def _hand_out(self, job: TransferJob) -> None:
        """Queue `job` (lock held), with a new thread if every thread is busy."""
        self._queued += 1
        if (
            self._queued > self._idle
            and len(self._threads) < self._max_threads
            and not self._closed
        ):
            self._spawn()
        self._jobs.put(job)

    def _spawn(self) -> None:
        slot = len(self._threads)
        thread = threading.Thread(
            target=self._run, args=(slot,), name=f"kv-writer-{slot}", daemon=True
        )
        self._threads.append(thread)
        self._idle += 1  # counted before it runs, so the next job does not start another
        thread.start()

    def _run(self, slot: int) -> None:
        while True:
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is not None:
                    self._queued -= 1
            if job is None:
                return
            try:
                result = self._write_room(job, slot)
            except Exception as e:  # never lose a room: report whatever broke
                log.exception("room %d: writer crashed", job.room)
                result = JobResult(job.room, f"writer crashed: {e!r}", None)
            with self._lock:
                self._idle += 1
                held = self._held.get(job.peer_key)
                if held:
                    self._hand_out(held.popleft())  # the peer's share passes to its next room
                else:
                    self._writing[job.peer_key] -= 1
            self._on_done(result)

    def _write_room(self, job: TransferJob, slot: int) -> JobResult:
        start = time.perf_counter()
        if job.cancel.is_set():
            return JobResult(job.room, "cancelled before the write started", None)
        batches: list[tuple[TransferBackend, str, DescriptorBatch]] = []
        nbytes = descriptors = 0
        try:
            for part in job.parts:
                descs = slice_descriptors(
                    part.slice, part.src, part.dst, job.src_pages, job.dst_pages
                )
                nbytes, descriptors = nbytes + descs.nbytes, descriptors + len(descs)
                if len(descs):
                    pieces = split_batches(descs, self._max_batch)
                    batches += [(part.backend, part.peer_key, b) for b in pieces]
        except ValueError as e:
            return JobResult(job.room, str(e), None)
        error = self._write_batches(job, _interleaved(batches))
        if not error:
            error = self._write_metadata(job, slot)
        metrics = TransferMetrics(
            bytes=nbytes + len(job.meta_bytes),
            descriptors=descriptors + 1,
            batches=len(batches) + 1,
            duration_s=time.perf_counter() - start,
        )
        return JobResult(job.room, error, metrics)

    def _write_batches(
        self, job: TransferJob, batches: list[tuple[TransferBackend, str, DescriptorBatch]]
    ) -> str:
        inflight: deque[tuple[TransferBackend, object]] = deque()
        error = ""
        for backend, key, batch in batches:
            if job.cancel.is_set():
                error = "cancelled"
                break
            if len(inflight) >= self._max_inflight:
                waiting, handle = inflight.popleft()
                error = waiting.wait(handle, job.deadline)
                if error:
                    break
            try:
                inflight.append((backend, backend.submit(key, batch)))
            except TransferError as e:
                error = str(e)
                break
        # NOTE: drain even after an error, so nothing of this room is in flight when we report.
        for waiting, handle in inflight:
            waited = waiting.wait(handle, job.deadline)
            error = error or waited
        return error

    def _write_metadata(self, job: TransferJob, slot: int) -> str:
        src = self.staging.address(slot)
        ctypes.memmove(src, job.meta_bytes, len(job.meta_bytes))
        batch = DescriptorBatch.single(src, job.meta_dst, len(job.meta_bytes))
        try:
            handle = self._backend.submit(job.peer_key, batch)
        except TransferError as e:
            return str(e)
        return self._backend.wait(handle, job.deadline)


def _interleaved(
    batches: list[tuple[Any, str, DescriptorBatch]],
) -> list[tuple[Any, str, DescriptorBatch]]:
    """Batches taken from each engine in turn, so every rank's engine is busy at once."""
    by_engine: dict[int, deque[tuple[Any, str, DescriptorBatch]]] = {}
    for item in batches:
        by_engine.setdefault(id(item[0]), deque()).append(item)
    out: list[tuple[Any, str, DescriptorBatch]] = []
    while by_engine:
        for key in list(by_engine):
            out.append(by_engine[key].popleft())
            if not by_engine[key]:
                del by_engine[key]
    return out
