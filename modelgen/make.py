"""`make_model`: a tiny random-weight HF checkpoint of one architecture, written to a directory.

It writes what a Hugging Face model repository holds: `config.json` (saved by the transformers
config class), `generation_config.json`, `model.safetensors` (or shards plus
`model.safetensors.index.json`) with HF tensor names, and a tokenizer (`tokenizer.json`,
`tokenizer_config.json` with a chat template). transformers loads it as it loads a real
checkpoint, which makes it the correctness oracle for the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelgen.archs import arch_spec, build_config, build_generation_config, resolve_shape
from modelgen.fp8 import FP8_BLOCK, fp8_quantization_config, quantize_fp8
from modelgen.tokenizers import special_token_ids, tokenizer_spec
from modelgen.weights import DEFAULT_MAX_SHARD_BYTES, random_weights, save_weights, torch_dtype


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
    init_device: str = "cpu",
) -> Path:
    """Write a tiny random-weight HF checkpoint of `arch` into `out` and return its path.

    `intermediate` defaults to 3 * hidden, `head_dim` to hidden // heads, and
    `max_position_embeddings` to 4096 (or the scaled context of `rope_scaling`, e.g. Llama-3's
    factor * original_max_position_embeddings). Weights above `max_shard_bytes` are sharded.
    `tokenizer` defaults to the arch's family (deepseek for deepseek_v2/v3, else qwen), and
    `rope_scaling` to the arch's (DeepSeek's YaRN). `config_overrides` sets transformers config
    keys last (e.g. {"q_lora_rank": None}). `fp8` quantizes the decoder projections in
    `fp8_block` tiles like DeepSeek-V3's release; `mtp_layers` appends its multi-token-prediction
    layers (which transformers and pdserve skip). `init_device` runs the random draws there
    ("cuda": fast for full-size shapes; other bytes than the CPU's).
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
    tensors = random_weights(config, seed, weight_dtype, init_device)
    if fp8:
        config.quantization_config = fp8_quantization_config(fp8_block)
        tensors = quantize_fp8(tensors, fp8_block)
    config.save_pretrained(out)
    build_generation_config(ids).save_pretrained(out)
    save_weights(tensors, out, max_shard_bytes)
    hf_tokenizer.save_pretrained(out, save_jinja_files=False)
    for path in out.iterdir():  # NOTE: safetensors writes 0600; a checkpoint is for all to read
        path.chmod(0o644)
    return out
