"""The architecture table: how each `--arch` becomes a transformers config for a tiny model.

A checkpoint's config.json is the transformers config class's own `save_pretrained`, so it
carries the keys (and key versions) that transformers and the engine read from real ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelgen.deepseek import (
    DEEPSEEK_V2_YARN,
    DEEPSEEK_V3_YARN,
    deepseek_v2_config,
    deepseek_v3_config,
)
from modelgen.shape import ModelShape, default_context

if TYPE_CHECKING:
    import torch

    from modelgen.tokenizers import SpecialTokenIds


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture becomes a transformers config; weights follow from the config."""

    config_class: str  # transformers class name, e.g. "LlamaConfig"
    architecture: str  # the `architectures` entry, e.g. "LlamaForCausalLM"
    rope_theta: float
    explicit_head_dim: bool  # the config carries `head_dim` (else it is hidden // heads)
    extra_config: Callable[[ModelShape], dict[str, Any]] | None = None  # MoE, MLA, ... keys
    default_tokenizer: str = "qwen"
    default_rope_scaling: dict[str, Any] | None = None  # when make_model gets none


# NOTE: weight names and shapes come from instantiating the transformers model on the meta device,
# so a new architecture (deepseek_v3) needs only an entry here (with its extra_config keys) and,
# for tensors of a new role, a rule in `modelgen.weights.init_tensor`.
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("LlamaConfig", "LlamaForCausalLM", 500000.0, explicit_head_dim=True),
    "qwen2": ArchSpec("Qwen2Config", "Qwen2ForCausalLM", 1000000.0, explicit_head_dim=False),
    "qwen3": ArchSpec("Qwen3Config", "Qwen3ForCausalLM", 1000000.0, explicit_head_dim=True),
    "deepseek_v3": ArchSpec(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        10000.0,
        explicit_head_dim=False,
        extra_config=deepseek_v3_config,
        default_tokenizer="deepseek",
        default_rope_scaling=DEEPSEEK_V3_YARN,
    ),
    "deepseek_v2": ArchSpec(
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        10000.0,
        explicit_head_dim=False,
        extra_config=deepseek_v2_config,
        default_tokenizer="deepseek",
        default_rope_scaling=DEEPSEEK_V2_YARN,
    ),
}


def arch_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (choose one of {sorted(ARCHS)})")
    return ARCHS[arch]


def resolve_shape(
    spec: ArchSpec,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int | None,
    head_dim: int | None,
    tie_word_embeddings: bool,
    max_position_embeddings: int | None,
    rope_scaling: dict[str, Any] | None,
) -> ModelShape:
    """Fill the defaults and check that the sizes fit together."""
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if hidden % heads and head_dim is None:
        raise ValueError(
            f"hidden ({hidden}) must be a multiple of heads ({heads}), or set head_dim"
        )
    natural_head_dim = hidden // heads
    if not spec.explicit_head_dim and head_dim not in (None, natural_head_dim):
        raise ValueError(
            f"{spec.architecture} derives head_dim from hidden // heads ({natural_head_dim}), "
            f"got head_dim={head_dim} (leave head_dim unset, or use llama/qwen3)"
        )
    return ModelShape(
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate or 3 * hidden,
        head_dim=head_dim or natural_head_dim,
        max_position_embeddings=max_position_embeddings or default_context(rope_scaling),
        tie_word_embeddings=tie_word_embeddings,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
    )


def build_config(
    spec: ArchSpec,
    shape: ModelShape,
    ids: SpecialTokenIds,
    dtype: torch.dtype,
    overrides: dict[str, Any] | None = None,
    mtp_layers: int = 0,
) -> Any:
    """The transformers config object, as a checkpoint saved by transformers carries it."""
    import transformers

    rope = {"rope_type": "default", **(shape.rope_scaling or {}), "rope_theta": spec.rope_theta}
    kwargs: dict[str, Any] = {
        "vocab_size": ids.vocab_size,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "rope_parameters": rope,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos[0],
        "pad_token_id": ids.pad,
    }
    if spec.explicit_head_dim:
        kwargs["head_dim"] = shape.head_dim
    if spec.extra_config is not None:
        kwargs.update(spec.extra_config(shape))
    if mtp_layers:
        if "num_mtp_layers" not in kwargs:
            raise ValueError(f"{spec.architecture} has no multi-token-prediction layers")
        kwargs["num_mtp_layers"] = mtp_layers
    kwargs.update(overrides or {})
    config = getattr(transformers, spec.config_class)(**kwargs)
    config.architectures = [spec.architecture]
    config.dtype = dtype
    return config


def build_generation_config(ids: SpecialTokenIds) -> Any:
    """Special token ids only: sampling defaults stay with the caller (greedy in HF)."""
    from transformers import GenerationConfig

    eos: int | list[int] = ids.eos[0] if len(ids.eos) == 1 else list(ids.eos)
    return GenerationConfig(bos_token_id=ids.bos, eos_token_id=eos, pad_token_id=ids.pad)
