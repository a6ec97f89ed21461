"""Llama family: Llama 2/3 (rope scaling, tied or untied embeddings), Qwen2 (qkv bias),
Qwen3 (per-head q/k RMSNorm). Pure math: batching and KV paging live in the attention
backend, reached through `ctx.attention`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.linear import MergedLinear, Part, RowLinear
from engine.layers.mlp import GatedMLP
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from engine.layers.vocab import LMHead, VocabEmbedding
from engine.models.base import DecoderOnlyLM
from engine.models.loading import check_complete, load_param
from engine.parallel.group import Parallel
from engine.weights import WeightRef


class Attention(nn.Module):
    """Query heads split over the ranks, KV heads split (or shared where there are fewer)."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: Parallel) -> None:
        super().__init__()
        self.layer, self.head_dim = layer, cfg.head_dim
        self.q_heads = tp.split(cfg.num_heads, "num_attention_heads")
        kv_start, self.kv_heads = tp.kv_heads(cfg.num_kv_heads)
        q_size, kv_size = cfg.num_heads * self.head_dim, cfg.num_kv_heads * self.head_dim
        kv = Part(kv_size, kv_start * self.head_dim, self.kv_heads * self.head_dim)
        self.qkv_proj = MergedLinear(
            cfg.hidden_size,
            (Part.split(q_size, tp, "num_attention_heads"), kv, kv),
            cfg.attention_bias,
        )
        self.o_proj = RowLinear(q_size, cfg.hidden_size, tp=tp)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, ...], ctx: Any) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = self.qkv_proj.split(qkv)
        v = v.view(-1, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.view(-1, self.q_heads, self.head_dim))
            k = self.k_norm(k.view(-1, self.kv_heads, self.head_dim))
            q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        else:
            # q and k sit side by side in qkv: rotate them as one [T, q + kv heads] view
            heads = self.q_heads + self.kv_heads
            qk = apply_rotary(
                qkv[:, : heads * self.head_dim].view(-1, heads, self.head_dim), *cos_sin
            )
            q, k = qk[:, : self.q_heads], qk[:, self.q_heads :]
        out = ctx.attention(q, k, v, self.layer)
        return self.o_proj(out.reshape(-1, self.q_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: Parallel) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, tp)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, ...], ctx: Any) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(DecoderOnlyLM):
    # checkpoint projection name -> (our merged module name, shard index)
    MERGED: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, tp: Parallel | None = None) -> None:
        super().__init__()
        tp = tp or Parallel.single()
        self.cfg, self.tp = cfg, tp
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = (
            None if cfg.tie_word_embeddings else LMHead(cfg.vocab_size, cfg.hidden_size, tp)
        )

    def load_weights(self, weights: Iterable[tuple[str, WeightRef]]) -> None:
        """Load HF-named tensors (each rank reads its slices); raise on unknown, missing or
        mis-shaped weights."""
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self._load_one(name, tensor)
            if target is not None:
                loaded.add(target)
        check_complete(self, loaded)

    def _load_one(self, name: str, tensor: WeightRef) -> str | None:
        key = name.removeprefix("model.")
        if "rotary_emb" in key:
            return None
        if key == "lm_head.weight" and self.lm_head is None:
            return None  # tied: some checkpoints store the copy anyway
        parts = key.split(".")
        if len(parts) >= 4 and parts[-2] in self.MERGED:
            merged, shard = self.MERGED[parts[-2]]
            module_name = ".".join([*parts[:-2], merged])
            module = self.get_submodule(module_name)
            module.load_shard(shard, parts[-1], tensor, name)
            return f"{module_name}.{parts[-1]}#{shard}"
        return load_param(self, key, tensor, name, self.cfg.family)
