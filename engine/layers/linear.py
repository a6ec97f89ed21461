"""Linear layers that know how to load checkpoint tensors into themselves.

`MergedLinear` stores several checkpoint projections in one weight (q/k/v, gate/up) so the
model runs one matmul instead of several. Loading checks every shape and names the tensor.

Tensor parallelism lives here, so model files stay pure math: `ColumnLinear` keeps a slice of
the output rows (no communication), `RowLinear` a slice of the input columns and sums the
partial outputs over the ranks; `MergedLinear` slices each of its parts on its own (q, k and v
heads; gate and up halves). Each rank reads only its slice from the checkpoint.

Every matmul against a weight goes through `linear()`: on CPU, float32 runs on oneDNN instead of
the MKL sgemm that `F.linear` picks. MKL takes a slow path on AMD CPUs; on this project's AMD
EPYC machine oneDNN is 1.4x faster on the LM head and 2.2x on prefill-sized projections, with
the same float32 math. bfloat16 already goes to oneDNN through `F.linear`, which reorders the
weight on every call; `pack_bf16_weights` gives each layer a copy reordered once (on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from engine.parallel.group import Parallel
from engine.weights import WeightRef, read


def _onednn_linear_op():
    """The oneDNN linear op of this torch build, or None where there is none."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_ONEDNN_LINEAR = _onednn_linear_op()


SMALL_ROWS = 32  # below this many rows oneDNN's per-call cost outweighs its faster kernel
# NOTE: a bfloat16 weight reordered once into oneDNN's blocked layout skips the reorder F.linear
# does on every call: measured here (2 threads), a [6144, 1024] weight at 1 / 16 / 256 rows took
# 209 / 361 / 3300 us through F.linear and 86 / 229 / 3118 us packed, the same results. The
# packed copy sits beside the weight (other code reads the weight), so it is made only while
# a model's copies stay within PACK_MAX_BYTES.
PACK_MAX_BYTES = 1 << 30
PACK_ROWS = 16  # the batch the reorder is tuned for (every row count works)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN for float32 on CPU (decode-sized inputs of a
    few rows stay on `F.linear`: 5-12 us a call there against 11-18 us on oneDNN), and on
    `packed` (`pack_bf16_weights`) for bfloat16."""
    if packed is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        rows = x.reshape(-1, x.shape[-1])
        out = _ONEDNN_LINEAR(rows, packed, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])
    if (
        _ONEDNN_LINEAR is not None
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.numel() >= SMALL_ROWS * x.shape[-1]
    ):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_bf16_weights(model: nn.Module, budget: int = PACK_MAX_BYTES) -> int:
    """Give each bfloat16 CPU `Linear` of `model` its weight in oneDNN's layout (`linear` then
    uses it); the bytes packed, 0 where oneDNN cannot or the copies would pass `budget`."""
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if _ONEDNN_LINEAR is None or reorder is None:
        return 0
    layers = [
        m
        for m in model.modules()
        if isinstance(m, Linear) and m.weight.dtype == torch.bfloat16 and m.weight.is_cpu
    ]
    size = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if not layers or size > budget:
        return 0
    for m in layers:
        m.packed = reorder(m.weight.detach(), PACK_ROWS)
    return size


def copy_checked(param: torch.Tensor, loaded: WeightRef, name: str) -> None:
    """Copy `loaded` into `param`, or raise naming the tensor and both shapes."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"weight {name!r} has shape {tuple(loaded.shape)} but the config implies "
            f"{tuple(param.shape)} (config.json does not match the weights)"
        )
    with torch.no_grad():
        param.copy_(read(loaded).to(param.dtype))


def copy_slice(
    param: torch.Tensor, loaded: WeightRef, name: str, dim: int, start: int, full: int
) -> None:
    """Copy rows [start, start + param.shape[dim]) of `loaded` along `dim` (0 or 1) into `param`;
    `loaded` must have `full` rows there (and param's shape elsewhere)."""
    expected = list(param.shape)
    expected[dim] = full
    if list(loaded.shape) != expected:
        raise ValueError(
            f"weight {name!r} has shape {tuple(loaded.shape)} but the config implies "
            f"{tuple(expected)} (config.json does not match the weights)"
        )
    index = [slice(None)] * (dim + 1)
    index[dim] = slice(start, start + param.shape[dim])
    with torch.no_grad():
        param.copy_(read(loaded, *index).to(param.dtype))


class Linear(nn.Module):
    """A linear layer every rank holds whole."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's layout (bfloat16, CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)

    def load_param(self, kind: str, loaded: WeightRef, name: str) -> None:
        copy_checked(self._param(kind, name), loaded, name)

    def _param(self, kind: str, name: str) -> torch.Tensor:
        param = self.weight if kind == "weight" else self.bias
        if param is None:
            raise ValueError(f"{name!r} is a bias but the config says this layer has none")
        return param


class ColumnLinear(Linear):
    """Output rows split over the ranks: rank r computes rows [r * out/tp, (r + 1) * out/tp)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, *, tp: Parallel
    ) -> None:
        super().__init__(in_features, tp.split(out_features, "output features"), bias)
        self.full, self.start = out_features, tp.rank * self.weight.shape[0]

    def load_param(self, kind: str, loaded: WeightRef, name: str) -> None:
        copy_slice(self._param(kind, name), loaded, name, 0, self.start, self.full)


class RowLinear(Linear):
    """Input columns split over the ranks; the partial outputs are summed over the ranks
    (unless `reduce` is off: a caller that sums several partial results reduces once)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        tp: Parallel,
        reduce: bool = True,
    ) -> None:
        super().__init__(tp.split(in_features, "input features"), out_features, bias)
        self.tp, self.reduce = tp, reduce
        self.full, self.start = in_features, tp.rank * self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias, self.packed)
        out = linear(x, self.weight, packed=self.packed)
        if self.reduce:
            self.tp.all_reduce(out)
        # NOTE: the bias is added once, after the sum (a partial result would count it tp times)
        if self.bias is not None and (self.reduce or self.tp.rank == 0):
            out = out + self.bias
        return out

    def load_param(self, kind: str, loaded: WeightRef, name: str) -> None:
        if kind == "bias":
            copy_checked(self._param(kind, name), loaded, name)
        else:
            copy_slice(self.weight, loaded, name, 1, self.start, self.full)


@dataclass(frozen=True)
class Part:
    """One projection of a merged layer: the checkpoint has `size` rows, this rank keeps
    [start, start + length)."""

    size: int
    start: int = 0
    length: int = -1  # -1: every row

    @property
    def rows(self) -> int:
        return self.size if self.length < 0 else self.length

    @staticmethod
    def split(size: int, tp: Parallel, what: str) -> Part:
        """An even split over the ranks."""
        length = tp.split(size, what)
        return Part(size, tp.rank * length, length)


class MergedLinear(Linear):
    """Several projections of the same input, stacked along the output dimension (each part
    possibly a slice of its checkpoint tensor: column parallel)."""

    def __init__(
        self, in_features: int, out_sizes: Sequence[int | Part], bias: bool = False
    ) -> None:
        self.parts = tuple(p if isinstance(p, Part) else Part(p) for p in out_sizes)
        super().__init__(in_features, sum(p.rows for p in self.parts), bias)
        self.out_sizes = tuple(p.rows for p in self.parts)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = sum(self.out_sizes[:shard])
        return start, start + self.out_sizes[shard]

    def load_shard(self, shard: int, kind: str, tensor: WeightRef, name: str) -> None:
        """Load one projection's `weight` or `bias` (kind) into its rows."""
        start, end = self.shard_range(shard)
        part = self.parts[shard]
        copy_slice(self._param(kind, name)[start:end], tensor, name, 0, part.start, part.size)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.out_sizes, dim=-1)
