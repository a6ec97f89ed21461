"""Rotary position embeddings (NeoX half-rotation layout, as HF Llama/Qwen use; DeepSeek's
interleaved pairs through `deinterleave`).

Scaling types: default, linear, llama3, yarn (with its cos/sin attention factor). cos/sin are
computed per step from the positions, in float32, exactly as the reference computes them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.arch_config import yarn_mscale


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def yarn_factor(scaling: dict[str, Any], max_positions: int | None) -> float:
    """YaRN's stretch; DeepSeek configs may leave it to max_positions / original."""
    if scaling.get("factor") is not None:
        return float(scaling["factor"])
    if max_positions is None:
        raise ValueError("yarn rope scaling without 'factor' needs max_position_embeddings")
    return max_positions / float(scaling["original_max_position_embeddings"])


def yarn_inv_freq(dim: int, theta: float, scaling: dict[str, Any], factor: float) -> torch.Tensor:
    """Blend interpolated and original frequencies by a linear ramp over the dims (as HF)."""
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    old_len = float(scaling["original_max_position_embeddings"])

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_attention_factor(scaling: dict[str, Any] | None, max_positions: int | None) -> float:
    """The factor YaRN multiplies cos and sin by (1 for the other scaling types)."""
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = yarn_factor(scaling, max_positions)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def rope_inv_freq(
    dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int | None = None
) -> torch.Tensor:
    inv_freq = default_inv_freq(dim, theta)
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    if rope_type == "yarn":
        return yarn_inv_freq(dim, theta, scaling, yarn_factor(scaling, max_positions))
    raise ValueError(
        f"rope scaling type {rope_type!r} is not supported (use default, linear, llama3, yarn)"
    )


class RotaryEmbedding(torch.nn.Module):
    def __init__(
        self,
        dim: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        max_positions: int | None = None,
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(dim, theta, scaling, max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = rope_attention_factor(scaling, max_positions)

    def _apply(self, fn, recurse=True):
        # NOTE: the frequencies stay float32 whatever dtype the model is cast to: in bfloat16
        # (8 bits of mantissa) a position's angle is off by up to position * 2^-9 radians, so
        # rotations go wrong from a few hundred tokens on. transformers keeps them float32 too.
        kept = self.inv_freq.detach().float().clone()
        super()._apply(fn, recurse)
        self.inv_freq = kept.to(self.inv_freq.device)
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and sin of shape [T, 1, dim/2] for broadcasting over heads."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, dim]; rotate the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's rope pairs (x0, x1), (x2, x3), ... regrouped as halves, so `apply_rotary`
    rotates them (what HF's `apply_rotary_pos_emb_interleave` computes)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
