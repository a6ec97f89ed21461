"""DeepSeek-V3 (and V2): multi-head latent attention (MLA) and DeepSeek MoE. Pure math:
paging lives in the attention backend (`ctx.attention_mla`), routing in engine/layers/moe.py.

MLA with absorbed projections. kv_b_proj maps the latent c to each head's k_nope (W_UK) and
v (W_UV), so

    q_nope . k_nope = (q_nope W_UK) . c        out_h = W_UV (softmax(...) @ c)

and the KV cache holds only [c | k_rope] (kv_lora_rank + qk_rope_head_dim per token per
layer). The backend attends in latent space for prefill and decode alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.linear import ColumnLinear, Linear, RowLinear
from engine.layers.mlp import GatedMLP
from engine.layers.moe import MoE, RoutedExperts, fp8_experts_on_device
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary, deinterleave
from engine.layers.vocab import LMHead, VocabEmbedding
from engine.models.base import DecoderOnlyLM
from engine.models.loading import check_complete, load_param
from engine.parallel.group import Parallel
from engine.weights import WeightRef

# NOTE: the q/kv low-rank norms use RMSNorm's default eps in both the reference and transformers,
# not config.rms_norm_eps.
LORA_NORM_EPS = 1e-6
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


class MLAttention(nn.Module):
    """Heads split over the ranks (q, kv_b and o projections); the latent path (q_a,
    kv_a_proj_with_mqa) is the same on every rank, and so is the latent cache."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: Parallel) -> None:
        super().__init__()
        mla = cfg.mla
        assert mla is not None
        self.mla, self.layer = mla, layer
        self.heads = tp.split(cfg.num_heads, "num_attention_heads")
        hidden, q_size = cfg.hidden_size, cfg.num_heads * mla.qk_head_dim
        lora, bias = mla.q_lora_rank, cfg.attention_bias
        self.q_proj = ColumnLinear(hidden, q_size, tp=tp) if lora is None else None
        self.q_a_proj = Linear(hidden, lora, bias) if lora is not None else None
        self.q_a_layernorm = RMSNorm(lora, LORA_NORM_EPS) if lora is not None else None
        self.q_b_proj = ColumnLinear(lora, q_size, tp=tp) if lora is not None else None
        rank = mla.kv_lora_rank
        self.kv_a_proj_with_mqa = Linear(hidden, rank + mla.qk_rope_head_dim, bias)
        self.kv_a_layernorm = RMSNorm(rank, LORA_NORM_EPS)
        kv_b = cfg.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim)
        self.kv_b_proj = ColumnLinear(rank, kv_b, tp=tp)
        self.o_proj = RowLinear(cfg.num_heads * mla.v_head_dim, hidden, bias, tp=tp)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, ...], ctx: Any) -> torch.Tensor:
        mla = self.mla
        q = self._queries(x).view(-1, self.heads, mla.qk_head_dim)
        q_nope, q_rope = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(
            [mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1
        )
        latent = self.kv_a_layernorm(latent)
        q_rope = self._rotate(q_rope, cos_sin)
        k_rope = self._rotate(k_rope[:, None, :], cos_sin)[:, 0]
        w_uk, w_uv = self._absorbed()
        q_latent = torch.einsum("thd,hdr->thr", q_nope, w_uk)
        out = ctx.attention_mla(q_latent, q_rope, latent, k_rope, self.layer)
        out = torch.einsum("thr,hvr->thv", out, w_uv)
        return self.o_proj(out.reshape(-1, self.heads * mla.v_head_dim))

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _rotate(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return apply_rotary(deinterleave(x) if self.mla.rope_interleave else x, *cos_sin)

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, R] and W_UV [H, v, R]: views of kv_b_proj's weight."""
        mla = self.mla
        w = self.kv_b_proj.weight.view(self.heads, -1, mla.kv_lora_rank)
        return w[:, : mla.qk_nope_head_dim], w[:, mla.qk_nope_head_dim :]


def fp8_experts(cfg: ModelConfig, tp: Parallel) -> bool:
    """Whether the routed experts of an FP8 block checkpoint stay FP8 (the GPU path: no
    dequantize-on-load)."""
    blocks = cfg.fp8 is not None and cfg.fp8.weight_block is not None
    return blocks and fp8_experts_on_device(tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: Parallel) -> None:
        super().__init__()
        self.self_attn = MLAttention(cfg, layer, tp.dense)
        moe = cfg.moe
        if moe is not None and moe.is_moe_layer(layer):
            self.mlp: nn.Module = MoE(cfg.hidden_size, moe, tp, keep_fp8=fp8_experts(cfg, tp))
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp.dense)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, ...], ctx: Any) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV3ForCausalLM(DecoderOnlyLM):
    MERGED: ClassVar[dict[str, tuple[str, int]]] = {
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, tp: Parallel | None = None) -> None:
        super().__init__()
        if cfg.mla is None:
            raise ValueError(
                f"{cfg.family} needs MLA sizes (kv_lora_rank, qk_rope_head_dim, ...) in config.json"
            )
        tp = tp or Parallel.single()
        self.cfg, self.tp = cfg, tp
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp.dense)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            cfg.mla.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.lm_head = (
            None if cfg.tie_word_embeddings else LMHead(cfg.vocab_size, cfg.hidden_size, tp.dense)
        )

    # ---- loading ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, WeightRef]]) -> None:
        """Load HF-named tensors (per-expert or stacked experts; each rank reads its slices);
        skip multi-token-prediction layers (index >= num_hidden_layers); raise on unknown,
        missing or mis-shaped weights."""
        loaded: set[str] = set()
        for name, tensor in weights:
            loaded.update(self._load_one(name, tensor))
        for module in self.modules():
            if isinstance(module, RoutedExperts):
                module.finish_loading()
        pieces = {
            name: module.pieces()
            for name, module in self.named_modules()
            if isinstance(module, RoutedExperts)
        }
        check_complete(self, loaded, pieces)

    def _load_one(self, name: str, tensor: WeightRef) -> list[str]:
        key = name.removeprefix("model.")
        if self._skipped(key):
            return []
        if match := _EXPERT.match(key):
            prefix, expert, proj = match.groups()
            piece = self._module(prefix, name).load_expert(int(expert), proj, tensor, name)
            return [f"{prefix}#{piece}"]
        if match := _STACKED.match(key):
            prefix, param = match.groups()
            pieces = self._module(prefix, name).load_stacked(param, tensor, name)
            return [f"{prefix}#{piece}" for piece in pieces]
        parts = key.split(".")
        if len(parts) >= 4 and parts[-2] in self.MERGED:
            merged, shard = self.MERGED[parts[-2]]
            module_name = ".".join([*parts[:-2], merged])
            self._module(module_name, name).load_shard(shard, parts[-1], tensor, name)
            return [f"{module_name}.{parts[-1]}#{shard}"]
        try:
            return [load_param(self, key, tensor, name, self.cfg.family)]
        except ValueError as exc:
            if "unexpected weight" in str(exc):
                raise self._unexpected(name) from None
            raise

    def _skipped(self, key: str) -> bool:
        if "rotary_emb" in key or (key == "lm_head.weight" and self.lm_head is None):
            return True
        layer = _LAYER.match(key)
        return layer is not None and int(layer.group(1)) >= self.cfg.num_layers  # MTP layers

    def _module(self, module_name: str, name: str) -> Any:
        try:
            return self.get_submodule(module_name)
        except AttributeError:
            raise self._unexpected(name) from None

    def _unexpected(self, name: str) -> ValueError:
        return ValueError(
            f"unexpected weight {name!r} in checkpoint (not a {self.cfg.family} weight of this "
            "config: check q_lora_rank, first_k_dense_replace and moe_layer_freq in config.json)"
        )
