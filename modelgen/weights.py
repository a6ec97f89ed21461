"""Seeded random weights under the tensor names a released checkpoint holds, saved as safetensors.

Names and shapes come from instantiating the transformers model on the meta device (then renamed
to per-expert tensors and DeepSeek's multi-token-prediction layers, as released checkpoints hold
them), so a new architecture needs no list of tensors here, only an init rule for a new role.
Weights are seeded (same arguments, same bytes) and scaled so that greedy decoding wanders instead
of looping over one or two tokens, and different prompts continue differently.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

# A checkpoint bigger than this is written as shards (tests pass a small value to force it).
DEFAULT_MAX_SHARD_BYTES = 1 << 30

# Scales of the random init, tuned by measuring greedy decoding (see `init_tensor`).
LOGIT_STD = 2.0  # logits have about this standard deviation
QK_GAIN = 2.0  # sharp attention: the output depends on which tokens are where
DOWN_GAIN = 3.0  # the MLP (current token) outweighs the attention average (context)
NORM_JITTER = 0.1  # norm weights are +-(1 +- this), so a loader that drops them is caught
BIAS_STD = 0.2
CORRECTION_BIAS_STD = 0.1  # MoE e_score_correction_bias: shifts which experts win, visibly

_STACKED_EXPERTS = re.compile(r"^(.+\.experts)\.(gate_up_proj|down_proj)$")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype the weights are written in, by its config.json name."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r} (choose one of {sorted(dtypes)})")
    return dtypes[name]


def parameter_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes, read off the transformers model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    saved = model.state_dict()
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in saved})
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied checkpoints store only the embedding
    return shapes


def checkpoint_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as released checkpoints hold them: one tensor per expert, and
    DeepSeek's multi-token-prediction layers after the last decoder layer."""
    shapes = per_expert_shapes(parameter_shapes(config))
    mtp = getattr(config, "num_mtp_layers", 0) or 0
    return {**shapes, **mtp_shapes(shapes, config.num_hidden_layers, mtp)} if mtp else shapes


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


def random_weights(
    config: Any, seed: int, dtype: torch.dtype, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Seeded weights on the CPU: one generator, drawn in name order, so equal arguments give
    equal bytes. The draws run on `device` (a CUDA generator draws a billion-parameter model in
    a blink where the CPU's takes minutes; its bytes differ from the CPU's)."""
    generator = torch.Generator(device).manual_seed(seed)
    shapes = checkpoint_shapes(config)
    return {
        name: init_tensor(name, shapes[name], config, generator).to(dtype).cpu()
        for name in sorted(shapes)
    }


def init_tensor(
    name: str, shape: tuple[int, ...], config: Any, generator: torch.Generator
) -> torch.Tensor:
    """Init rule by tensor role.

    NOTE: random weights decode greedily into loops (one token, or two in turn) unless the scales
    fight it; these were measured with transformers' greedy generate. Embeddings and linear layers
    keep activations at unit scale, so the current token stays strong in the residual stream
    against the attention average over the context. q/k_proj (QK_GAIN) sharpen attention and
    down_proj (DOWN_GAIN) weighs the per-token MLP. Norm weights get random signs: with tied
    embeddings, logits = E @ (norm(x) * w) would otherwise favour the current token (x holds its
    embedding) and the token after it in turn. The final norm also sets the logit scale
    (LOGIT_STD), tied or not.
    """
    if name.endswith("norm.weight"):
        scale = LOGIT_STD / math.sqrt(config.hidden_size) if name == "model.norm.weight" else 1.0
        return scale * random_signs(shape, generator) * jitter(shape, generator)
    if name.endswith(".bias"):
        return BIAS_STD * normal(shape, generator)
    if name.endswith("e_score_correction_bias"):
        return CORRECTION_BIAS_STD * normal(shape, generator)
    if len(shape) != 2:
        raise ValueError(f"no init rule for {name} {shape} (add one to modelgen/weights.py)")
    if "embed_tokens" in name or name == "lm_head.weight":
        return normal(shape, generator)
    return linear_gain(name) * normal(shape, generator) / math.sqrt(shape[1])


def linear_gain(name: str) -> float:
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        return QK_GAIN
    if name.endswith("down_proj.weight"):
        return DOWN_GAIN
    return 1.0


def normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard normal draws on the generator's device."""
    return torch.randn(shape, generator=generator, device=generator.device)


def uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) draws on the generator's device."""
    return torch.rand(shape, generator=generator, device=generator.device)


def random_signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.where(uniform(shape, generator) < 0.5, -1.0, 1.0)


def jitter(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return 1.0 + NORM_JITTER * (2 * uniform(shape, generator) - 1)


def save_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus the HF index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    remove_weight_files(out)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: tensors[name].contiguous() for name in names}
        save_file(shard, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        total_parameters = sum(t.numel() for t in tensors.values())
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def remove_weight_files(out: Path) -> None:
    """Drop weights of an earlier write, so a directory never mixes shards of two checkpoints."""
    for path in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        path.unlink(missing_ok=True)
