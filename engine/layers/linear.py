"""Linear layers that know how to load checkpoint tensors into themselves.

`MergedLinear` stores several checkpoint projections in one weight (q/k/v, gate/up) so the
model runs one matmul instead of several. Loading checks every shape and names the tensor.
Tensor-parallel slicing will live here too, so model files stay pure math.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copy `loaded` into `param`, or raise naming the tensor and both shapes."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"weight {name!r} has shape {tuple(loaded.shape)} but the config implies "
            f"{tuple(param.shape)} (config.json does not match the weights)"
        )
    with torch.no_grad():
        param.copy_(loaded.to(param.dtype))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input, stacked along the output dimension."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = tuple(out_sizes)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = sum(self.out_sizes[:shard])
        return start, start + self.out_sizes[shard]

    def load_shard(self, shard: int, kind: str, tensor: torch.Tensor, name: str) -> None:
        """Load one projection's `weight` or `bias` (kind) into its rows."""
        start, end = self.shard_range(shard)
        param = self.weight if kind == "weight" else self.bias
        if param is None:
            raise ValueError(f"{name!r} is a bias but the config says this layer has none")
        copy_checked(param[start:end], tensor, name)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.out_sizes, dim=-1)
