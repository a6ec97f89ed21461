"""Llama family: Llama 2/3 (rope scaling, tied or untied embeddings), Qwen2 (qkv bias),
Qwen3 (per-head q/k RMSNorm). Pure math: batching and KV paging live in the attention
backend, reached through `ctx.attention`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.layers.linear import Linear, MergedLinear, copy_checked
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from engine.models.base import DecoderOnlyLM


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.q_heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, (q_size, kv_size, kv_size), cfg.attention_bias
        )
        self.o_proj = Linear(q_size, cfg.hidden_size)
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


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, (size, size))
        self.down_proj = Linear(size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
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

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; raise on unknown, missing or mis-shaped weights."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self._load_one(name, tensor, params)
            if target is not None:
                loaded.add(target)
        self._check_complete(params, loaded)

    def _load_one(self, name: str, tensor: torch.Tensor, params: dict) -> str | None:
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
        if key not in params:
            raise ValueError(
                f"unexpected weight {name!r} in checkpoint (not a {self.cfg.family} weight)"
            )
        copy_checked(params[key], tensor, name)
        return key

    def _check_complete(self, params: dict, loaded: set[str]) -> None:
        expected: set[str] = set()
        for key in params:
            module_name, _, _kind = key.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, MergedLinear):
                expected.update(f"{key}#{i}" for i in range(len(module.out_sizes)))
            else:
                expected.add(key)
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(m.split("#")[0] for m in missing[:5])
            raise ValueError(
                f"checkpoint is missing {len(missing)} weights, e.g. {shown} "
                "(the safetensors files are incomplete or belong to another model)"
            )
