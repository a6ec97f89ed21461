"""The gated SiLU MLP (gate/up merged into one matmul), shared by dense layers and experts;
tensor parallel: gate/up column-split, down row-split."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.layers.linear import MergedLinear, Part, RowLinear
from engine.parallel.group import Parallel


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); checkpoints name the pieces gate_proj, up_proj, down_proj.

    `reduce=False` leaves the output a partial sum over the ranks (the caller sums once)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, tp: Parallel, *, reduce: bool = True
    ) -> None:
        super().__init__()
        half = Part.split(intermediate_size, tp, "intermediate_size")
        self.gate_up_proj = MergedLinear(hidden_size, (half, half))
        self.down_proj = RowLinear(intermediate_size, hidden_size, tp=tp, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)
