"""What a layer knows of the rank group it runs in: its rank, the group's size, and the
collectives it needs (all-reduce, all-gather, all-to-all).

`Parallel.single()` is one rank and no torch.distributed at all: every collective is the
identity, so a model built without a group runs exactly as before. Rank groups are made by
engine/parallel/ranks.py; layers only ever see this handle.

The group is a process group object of its own (built from the rank group's store), never
torch.distributed's default one: two engines in one process each have theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TokenExchange:
    """How this step's MoE layers exchange tokens under expert parallelism, set by the runner
    alike on every rank: at a fixed capacity with no host sync (decode steps, and what a CUDA
    graph holds; engine/layers/ep.py `exchange_fixed`), `fixed_rows` being the step's token
    count on the rank with the most (every rank's, unless DP attention gives each its own);
    or (None) as the layer sees fit, sized on the host where ranks' tokens differ."""

    fixed_rows: int | None = None

    @contextmanager
    def fixed(self, rows: int | None) -> Iterator[None]:
        """Exchange at a fixed capacity for `rows` tokens (None: sized on the host) within."""
        previous, self.fixed_rows = self.fixed_rows, rows
        try:
            yield
        finally:
            self.fixed_rows = previous


@dataclass(frozen=True)
class Parallel:
    """A rank's place in its tensor/expert-parallel group."""

    rank: int = 0
    size: int = 1
    group: Any = None  # the torch.distributed process group (None for one rank)
    ep: bool = False  # routed experts partitioned over the ranks (else sliced like dense MLPs)
    # gloo: sums and gathers as one broadcast per rank, in turn. Measured between two processes
    # here: gloo's allreduce of a [16, 64] float32 tensor took 0.4-1.6 ms and two broadcasts
    # 0.08 ms; at [512, 1024], 2.1-2.7 ms against 0.95 ms.
    by_broadcast: bool = False
    # DP attention: each rank computes its own tokens; only the routed experts are spread (ep)
    dp: bool = False
    exchange: TokenExchange = field(default_factory=TokenExchange, compare=False)

    @staticmethod
    def single() -> Parallel:
        return Parallel()

    @property
    def dense(self) -> Parallel:
        """The split of attention, dense MLPs, shared experts and vocabulary: this group, or
        none under DP attention (each rank holds them whole and runs them on its own tokens)."""
        return Parallel.single() if self.dp else self

    @property
    def ep_size(self) -> int:
        return self.size if self.ep else 1

    def split(self, total: int, what: str) -> int:
        """`total` / size, or a clear error where it does not divide."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by tp_size {self.size}")
        return total // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (the same sum, in rank order, on every rank)."""
        if self.size == 1:
            return x
        if not self.by_broadcast:
            self.group.allreduce([x]).wait()
            return x
        parts = self._broadcast_all(x)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return x.copy_(total)

    def _broadcast_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape on all), rank order; one broadcast per rank in turn."""
        x = x.contiguous()
        parts = [x if r == self.rank else torch.empty_like(x) for r in range(self.size)]
        for root, part in enumerate(parts):
            self.group.broadcast(part, root).wait()
        return parts

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` (same shape on all) along `dim`."""
        if self.size == 1:
            return x
        if self.by_broadcast:
            return torch.cat(self._broadcast_all(x), dim=dim)
        x = x.contiguous()
        out = x.new_empty((self.size, *x.shape))
        self.group.allgather([list(out.unbind(0))], [x]).wait()
        return torch.cat(out.unbind(0), dim=dim)

    def all_to_all(
        self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """Rows of `x` go to rank r in blocks of send_counts[r]; returns what the ranks sent us,
        in rank order (recv_counts[r] rows from rank r)."""
        if self.size == 1:
            return x
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        self.group.alltoall_base(out, x.contiguous(), recv_counts, send_counts).wait()
        return out

    def all_to_all_equal(self, x: torch.Tensor) -> torch.Tensor:
        """x [size, ...]: block r goes to rank r; returns [size, ...], block r from rank r.
        Sized by the shape alone (no host sync: a CUDA graph can hold it)."""
        if self.size == 1:
            return x
        out = torch.empty_like(x)
        self.group.alltoall_base(out, x.contiguous(), [], []).wait()
        return out

    def exchange_counts(self, send_counts: list[int], device: torch.device) -> list[int]:
        """How many rows each rank will send us, given how many we send each."""
        if self.size == 1:
            return list(send_counts)
        send = torch.tensor(send_counts, dtype=torch.long, device=device)
        recv = torch.empty_like(send)
        self.group.alltoall_base(recv, send, [1] * self.size, [1] * self.size).wait()
        return recv.tolist()

    def kv_heads(self, total: int) -> tuple[int, int]:
        """(first KV head, count) this rank holds: an even split, or one head shared by
        size/total ranks when there are fewer KV heads than ranks."""
        if total >= self.size:
            count = self.split(total, "num_key_value_heads")
            return self.rank * count, count
        if self.size % total:
            raise ValueError(
                f"tp_size {self.size} must be a multiple of num_key_value_heads ({total}) "
                "when it exceeds them (each KV head is then replicated on tp_size/heads ranks)"
            )
        return self.rank // (self.size // total), 1
