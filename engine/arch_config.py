"""Architecture extras a `ModelConfig` may carry: MLA sizes, MoE routing, FP8 block weights.

Each is a frozen dataclass parsed from the HF `config.json` dict by a `from_hf` that returns None
when the checkpoint does not use the feature (so Llama configs carry `mla=None, moe=None`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCORING = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term, 0.1 * mscale * ln(factor) + 1 (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3).

    The KV cache holds `kv_lora_rank + qk_rope_head_dim` numbers per token per layer: the
    normalised compressed KV and the rotated decoupled rope key, shared by all heads.
    """

    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    softmax_scale: float

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @staticmethod
    def from_hf(hf: dict[str, Any], rope_scaling: dict[str, Any] | None) -> MLAConfig | None:
        if hf.get("kv_lora_rank") is None:
            return None
        nope, rope = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
        q_lora = hf.get("q_lora_rank")
        return MLAConfig(
            kv_lora_rank=int(hf["kv_lora_rank"]),
            q_lora_rank=None if q_lora is None else int(q_lora),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=int(hf["v_head_dim"]),
            # DeepSeek-V2 rotates interleaved pairs (complex numbers) and has no such key
            rope_interleave=bool(hf.get("rope_interleave", True)),
            softmax_scale=(nope + rope) ** -0.5 * softmax_mscale(rope_scaling),
        )


def softmax_mscale(rope_scaling: dict[str, Any] | None) -> float:
    """DeepSeek's YaRN scales the softmax by mscale(factor, mscale_all_dim) squared."""
    if not rope_scaling or not rope_scaling.get("mscale_all_dim"):
        return 1.0
    m = yarn_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
    return m * m


@dataclass(frozen=True)
class MoEConfig:
    """Routed + shared experts and how tokens pick experts (DeepSeek-V2/V3 routing).

    V3: sigmoid scores, `noaux_tc` (the correction bias steers the choice, groups ranked by their
    top-2 sum). V2: softmax scores, `greedy` or `group_limited_greedy` (groups ranked by max).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    num_shared_experts: int
    first_dense_layers: int
    layer_freq: int
    scoring: str
    topk_method: str
    num_groups: int
    topk_groups: int
    norm_topk_prob: bool
    routed_scaling_factor: float

    def __post_init__(self) -> None:
        if self.scoring not in SCORING or self.topk_method not in TOPK_METHODS:
            raise ValueError(
                f"MoE routing {self.scoring}/{self.topk_method} is not supported "
                f"(scoring_func one of {SCORING}, topk_method one of {TOPK_METHODS})"
            )
        if self.num_experts % self.num_groups or not 0 < self.topk_groups <= self.num_groups:
            raise ValueError(
                f"n_routed_experts ({self.num_experts}) must split into n_group "
                f"({self.num_groups}) equal groups and 0 < topk_group ({self.topk_groups}) <= n_group"
            )
        if self.top_k > self.topk_groups * self.experts_per_group:
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) exceeds the experts of topk_group "
                f"({self.topk_groups}) groups of {self.experts_per_group}; raise topk_group"
            )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's rule: dense below first_k_dense_replace, then every moe_layer_freq-th."""
        return layer >= self.first_dense_layers and layer % self.layer_freq == 0

    @staticmethod
    def from_hf(hf: dict[str, Any], family: str) -> MoEConfig | None:
        if not hf.get("n_routed_experts"):
            return None
        v3 = family == "deepseek_v3"
        return MoEConfig(
            num_experts=int(hf["n_routed_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            intermediate_size=int(hf["moe_intermediate_size"]),
            num_shared_experts=int(hf.get("n_shared_experts") or 0),
            first_dense_layers=int(hf.get("first_k_dense_replace") or 0),
            layer_freq=int(hf.get("moe_layer_freq") or 1),
            scoring=hf.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
            topk_method=hf.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
            num_groups=int(hf.get("n_group") or 1),
            topk_groups=int(hf.get("topk_group") or 1),
            norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        )


@dataclass(frozen=True)
class Fp8Config:
    """FP8 weights with `weight_scale_inv` per block (None: one scale per tensor)."""

    weight_block: tuple[int, int] | None

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> Fp8Config | None:
        quant = hf.get("quantization_config")
        if not quant:
            return None
        method = quant.get("quant_method")
        if method != "fp8":
            raise ValueError(
                f"quantization method {method!r} is not supported (pdserve loads fp8 block "
                "checkpoints; dequantize other checkpoints to bfloat16 first)"
            )
        block = quant.get("weight_block_size")
        return Fp8Config(None if block is None else (int(block[0]), int(block[1])))
