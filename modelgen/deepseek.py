"""DeepSeek V2/V3 in the architecture table: tiny MLA + MoE config keys and their YaRN rope.

The tensors follow from the config (modelgen/weights.py names them as the released checkpoints
do; modelgen/fp8.py quantizes them as V3 ships).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelgen.shape import ModelShape

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
