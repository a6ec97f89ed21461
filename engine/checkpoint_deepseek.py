"""The DeepSeek side of `engine.checkpoint`: tiny V2/V3 configs, the released checkpoints'
tensor naming (one tensor per expert, multi-token-prediction layers after the last layer), and
FP8 block quantization as DeepSeek-V3 ships it (`weight_scale_inv` per 128x128 tile).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from engine.checkpoint import ModelShape

# DeepSeek-V3's rope: YaRN stretching 4K to 160K (mscale and mscale_all_dim equal: the cos/sin
# factor is 1, the softmax gets mscale^2). V2 has the same with 0.707.
DEEPSEEK_V3_YARN = {
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
DEEPSEEK_V2_YARN = {**DEEPSEEK_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}

FP8_MAX = 448.0  # largest float8_e4m3fn value
FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size
_FP8_WEIGHT = re.compile(r"\.layers\.\d+\..*proj(_with_mqa)?\.weight$")
_STACKED_EXPERTS = re.compile(r"^(.+\.experts)\.(gate_up_proj|down_proj)$")


def mla_moe_config(shape: ModelShape) -> dict[str, Any]:
    """Tiny MLA + MoE sizes shared by V2 and V3 (the real ones are 512/1536/128/64/128)."""
    return {
        "num_key_value_heads": shape.heads,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "moe_intermediate_size": max(shape.hidden // 2, 8),
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
    }


def deepseek_v3_config(shape: ModelShape) -> dict[str, Any]:
    """V3 routing: sigmoid scores, correction bias, groups by top-2 sum, renormalised."""
    return {
        **mla_moe_config(shape),
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "num_mtp_layers": 0,
    }


def deepseek_v2_config(shape: ModelShape) -> dict[str, Any]:
    """V2 routing: softmax scores, groups by their best expert, not renormalised."""
    return {
        **mla_moe_config(shape),
        "n_shared_experts": 2,
        "topk_method": "group_limited_greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 2.0,
    }


# --- tensor names ----------------------------------------------------------------------------


def per_expert_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """transformers v5's stacked expert parameters, renamed to the per-expert tensors that
    released checkpoints hold (`mlp.experts.{e}.gate_proj.weight`); other names unchanged."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        match = _STACKED_EXPERTS.match(name)
        if match is None:
            out[name] = shape
            continue
        prefix, stacked = match.groups()
        experts, rows, cols = shape
        if stacked == "gate_up_proj":
            pieces = {"gate_proj": (rows // 2, cols), "up_proj": (rows // 2, cols)}
        else:
            pieces = {"down_proj": (rows, cols)}
        for e in range(experts):
            out.update({f"{prefix}.{e}.{p}.weight": s for p, s in pieces.items()})
    return out


def mtp_shapes(
    shapes: dict[str, tuple[int, ...]], num_layers: int, mtp_layers: int
) -> dict[str, tuple[int, ...]]:
    """Multi-token-prediction layers as V3 ships them (model.layers.61.* after 61 layers): a copy
    of the last decoder layer plus its own embedding, norms, eh_proj and head."""
    last = f"model.layers.{num_layers - 1}."
    layer_shapes = {k.removeprefix(last): s for k, s in shapes.items() if k.startswith(last)}
    vocab, hidden = shapes["model.embed_tokens.weight"]
    extras = {
        "embed_tokens.weight": (vocab, hidden),
        "enorm.weight": (hidden,),
        "hnorm.weight": (hidden,),
        "eh_proj.weight": (hidden, 2 * hidden),
        "shared_head.norm.weight": (hidden,),
        "shared_head.head.weight": (vocab, hidden),
    }
    out: dict[str, tuple[int, ...]] = {}
    for i in range(num_layers, num_layers + mtp_layers):
        out.update({f"model.layers.{i}.{k}": s for k, s in {**layer_shapes, **extras}.items()})
    return out


# --- FP8 -------------------------------------------------------------------------------------


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
