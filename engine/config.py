"""Frozen configuration objects for the engine.

`ModelConfig.from_hf` reads a transformers `config.json` written by either transformers v4
(`rope_theta`, `rope_scaling`, `torch_dtype`) or v5 (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.arch_config import Fp8Config, MLAConfig, MoEConfig
from engine.options import DTYPE_NAMES

# HF architecture name -> our model family. Qwen2 and Qwen3 are Llama with small twists.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn 'bfloat16' / 'torch.float32' / a torch.dtype into a torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r} (use one of float32, bfloat16, float16)")
    return getattr(torch, DTYPE_NAMES[key])


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from v4 or v5 keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None if rope_type == "default" else dict(params)
        return theta, scaling
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if rope_type == "default" else dict(scaling)
    return float(hf.get("rope_theta", 10000.0)), scaling


def _family(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf.get("model_type")
    if not archs and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    known = ", ".join(sorted(ARCHITECTURES))
    raise ValueError(
        f"unsupported architecture {archs or model_type!r} in config.json "
        f"(pdserve supports: {known})"
    )


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to know about a checkpoint."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()
    mla: MLAConfig | None = None  # DeepSeek latent attention (KV cache: one latent per token)
    moe: MoEConfig | None = None  # routed experts
    fp8: Fp8Config | None = None  # FP8 block-quantized weights (dequantized on load)
    hf: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def softmax_scale(self) -> float:
        """The attention softmax scale (MLA: over qk_head_dim, with YaRN's mscale)."""
        return self.head_dim**-0.5 if self.mla is None else self.mla.softmax_scale

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> ModelConfig:
        family = _family(hf)
        theta, scaling = _rope_settings(hf)
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        mla = MLAConfig.from_hf(hf, scaling)
        return ModelConfig(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=mla.qk_head_dim if mla else int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            dtype=parse_dtype(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            eos_token_ids=eos_ids,
            mla=mla,
            moe=MoEConfig.from_hf(hf, family),
            fp8=Fp8Config.from_hf(hf),
            hf=hf,
        )

    @staticmethod
    def load(model_dir: str | Path) -> ModelConfig:
        path = checkpoint_dir(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no config.json in {model_dir} (point --model at a Hugging Face checkpoint "
                "directory, or make one with `pdserve make-model`)"
            )
        return ModelConfig.from_hf(json.loads(path.read_text()))


def checkpoint_dir(model_dir: str | Path) -> Path:
    """`model_dir` as a Path; FileNotFoundError naming it where no such directory exists."""
    path = Path(model_dir)
    if not path.is_dir():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(
            f"no model directory at {model_dir}{where}: point --model or model.path at a "
            "Hugging Face checkpoint directory, or make one with `pdserve make-model`"
        )
    return path
