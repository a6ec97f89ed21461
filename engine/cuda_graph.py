"""Decode steps as CUDA graphs: one graph per batch-size bucket, replayed every decode step.

A decode step of a small batch launches hundreds of small kernels (a few per layer), and on a
GPU the host's time to launch them exceeds the GPU's time to run them. A captured graph replays
them all with one launch. What a graph holds fixed is every tensor's address and every kernel's
grid, so a step's inputs go into static tensors first: the token ids and positions (here), the
attention tables (the backend's `StaticDecode`: page tables, context lengths, write slots, a
fixed KV split count) and the outputs, each sized for the largest bucket. A bucket of B rows uses
their first B rows; a batch of b requests runs in the smallest bucket that holds it, rows b..B
padding (token 0 at position 0, attending to the reserved page 0), and the caller reads [:b].

```
 static rows:  | request 0 .. b-1 | padding .. B-1 | (larger buckets' rows) .. max bucket - 1 |
```

The graphs share one memory pool and are captured largest first (each smaller graph fits in
what the larger one freed), as vLLM and SGLang do: only one graph runs at a time, so their
intermediates may share memory. The outputs are copied into static tensors inside each graph,
so the pool holds one bucket's intermediates, not every bucket's logits.

With `capture=False` every step runs the same body eagerly over the same static tensors, as a
replay would: CPU tests (Triton's interpreter) check this path against the eager one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from engine.layers.attention.base import AttentionBatch

log = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 256
"""Decode batches past this (or past max_running) run eager."""
WARMUP_RUNS = 2
"""Eager runs of a bucket before its capture (Triton compiles, cuBLAS picks its kernels)."""

DecodeBody = Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, ...]]
"""(input_ids [B], positions [B], attention meta) -> outputs, each with B rows first."""


class StaticTables(Protocol):
    """A backend's decode tables in static tensors (triton_backend.StaticDecode)."""

    max_batch: int

    def meta(self, bucket: int) -> Any: ...

    def fits(self, batch: AttentionBatch) -> bool: ...

    def fill(self, batch: AttentionBatch, bucket: int) -> Any: ...


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, every 8 to 64, then every 16, up to `max_batch`
    (always the last). Padding a batch to its bucket costs at most 15 rows' work."""
    sizes = [1, 2, 4, *range(8, 64, 8), *range(64, MAX_GRAPH_BATCH + 1, 16)]
    return [s for s in sizes if s < max_batch] + [max_batch]


class HostSyncError(RuntimeError):
    """The decode body waits on the GPU from the host (an .item(), a sized-by-value result):
    a graph cannot hold it."""


class DecodeGraphs:
    """The decode body captured (or, with capture=False, run eagerly) over static tensors at
    each of `buckets` (ascending); `run` takes a decode-only step of up to `buckets[-1]` rows.

    `replays` counts the steps run through the static tensors (graph replays when captured)."""

    def __init__(
        self,
        body: DecodeBody,
        tables: StaticTables,
        device: torch.device,
        buckets: list[int],
        *,
        capture: bool,
    ) -> None:
        if buckets[-1] > tables.max_batch:
            raise ValueError(f"bucket {buckets[-1]} exceeds the static tables' {tables.max_batch}")
        self.body, self.tables, self.device, self.buckets = body, tables, device, buckets
        self.pin = device.type == "cuda"
        largest = buckets[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        # a first eager run at the largest bucket, all padding, gives the outputs' shapes
        meta = tables.fill(_no_rows(), largest)
        outs = body(self.input_ids, self.positions, meta)
        self.outputs = tuple(torch.empty_like(out) for out in outs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0
        if capture:
            self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket holding `rows` requests."""
        return next(b for b in self.buckets if b >= rows)

    def fits(self, batch: AttentionBatch) -> bool:
        return len(batch.q_lens) <= self.max_batch and self.tables.fits(batch)

    def run(
        self, ids: list[int], positions: list[int], batch: AttentionBatch, bucket_rows: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """One decode step of len(ids) requests (`fits(batch)`) in the bucket of
        max(len(ids), bucket_rows) rows (ranks that must replay alike agree on `bucket_rows`):
        the body's outputs, their first len(ids) rows (views of static tensors: the next step
        overwrites them)."""
        rows = len(ids)
        bucket = self.bucket_for(max(rows, bucket_rows))
        self.tables.fill(batch, bucket)
        pad = [0] * (bucket - rows)
        host = torch.tensor([[*ids, *pad], [*positions, *pad]], pin_memory=self.pin)
        self.input_ids[:bucket].copy_(host[0], non_blocking=True)
        self.positions[:bucket].copy_(host[1], non_blocking=True)
        graph = self.graphs.get(bucket)
        if graph is not None:
            with torch.cuda.device(self.device):
                graph.replay()
        else:
            self._forward(bucket)
        self.replays += 1
        return tuple(out[:rows] for out in self.outputs)

    def _forward(self, bucket: int) -> None:
        """The body over the first `bucket` static rows, its outputs into the static outputs:
        what a graph holds."""
        meta = self.tables.meta(bucket)
        outs = self.body(self.input_ids[:bucket], self.positions[:bucket], meta)
        for static, out in zip(self.outputs, outs, strict=True):
            static[:bucket].copy_(out)

    def _capture_all(self) -> None:
        start = time.perf_counter()
        with torch.cuda.device(self.device):
            self._check_no_host_sync(self.max_batch)
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream()
            for bucket in reversed(self.buckets):
                try:
                    self.graphs[bucket] = self._capture(bucket, pool, stream)
                except RuntimeError as exc:
                    raise RuntimeError(
                        f"capturing the decode CUDA graph of batch {bucket} failed: {exc} "
                        "(set cuda_graphs: false to run decode steps eager)"
                    ) from exc
            torch.cuda.synchronize()
        log.info(
            "captured %d decode CUDA graphs (batch %s) in %.1f s",
            len(self.graphs),
            ",".join(map(str, self.buckets)),
            time.perf_counter() - start,
        )

    def _check_no_host_sync(self, bucket: int) -> None:
        """One eager run with torch's sync check set to raise: a body that syncs fails here,
        clearly, rather than in the middle of a capture."""
        self.tables.fill(_no_rows(), bucket)
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self._forward(bucket)
        except RuntimeError as exc:
            if "synchronizing" not in str(exc):  # torch's words for a sync in "error" mode
                raise
            raise HostSyncError(str(exc).splitlines()[0]) from exc
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def _capture(self, bucket: int, pool: Any, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        """Warm the bucket up on the capture stream, then capture it (all rows padding)."""
        self.tables.fill(_no_rows(), bucket)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self._forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            self._forward(bucket)
        return graph


def _no_rows() -> AttentionBatch:
    """A step of no requests: every row of a bucket padding."""
    return AttentionBatch([], [], [], 1)
