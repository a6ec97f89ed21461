"""FP8 block quantization as DeepSeek-V3 ships it: decoder projections as float8_e4m3fn with a
float32 `weight_scale_inv` per 128x128 tile, and the config.json entry that announces it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.nn import functional as F

FP8_MAX = 448.0  # largest float8_e4m3fn value
FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size
_FP8_WEIGHT = re.compile(r"\.layers\.\d+\..*proj(_with_mqa)?\.weight$")


def fp8_quantization_config(block: tuple[int, int]) -> dict[str, Any]:
    """config.json's quantization_config, as DeepSeek-V3's."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }


def quantize_fp8(
    tensors: dict[str, torch.Tensor], block: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Every decoder-layer projection as float8_e4m3fn plus its float32 `weight_scale_inv`
    (one per block); embeddings, the LM head, norms and the router stay as they are."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.ndim == 2 and _FP8_WEIGHT.search(name):
            out[name], out[f"{name}_scale_inv"] = quantize_block_fp8(tensor, block)
        else:
            out[name] = tensor
    return out


def quantize_block_fp8(
    weight: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale_inv [ceil(rows / b0), ceil(cols / b1)]) with weight ~= fp8 * scale."""
    rows, cols = weight.shape
    w = weight.float()
    padded = F.pad(w, (0, -cols % block[1], 0, -rows % block[0]))
    grid = (padded.shape[0] // block[0], padded.shape[1] // block[1])
    tiles = padded.view(grid[0], block[0], grid[1], block[1])
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
