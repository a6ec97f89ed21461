"""The gated SiLU MLP (gate/up merged into one matmul), shared by dense layers and experts;
tensor parallel: gate/up column-split, down row-split."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.kernels.norm_act import NormAct
from engine.layers.linear import MergedLinear, Part, RowLinear
from engine.layers.norm import RMSNorm
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
        self.act_kernel: NormAct | None = None  # the native bfloat16 pass, set by the runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        kernel = self.act_kernel
        if kernel is not None and kernel.serves_silu_mul(gate_up):
            return self.down_proj(kernel.silu_mul(gate_up))
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(F.silu(gate) * up)


def use_norm_act(model: nn.Module, kernel: NormAct | None) -> None:
    """Every RMSNorm and gated MLP of `model` takes its bfloat16 pass from `kernel` (None:
    torch's ops); float32 models and shapes the kernel does not serve keep torch's."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernel = kernel
        elif isinstance(module, GatedMLP):
            module.act_kernel = kernel
