"""DeepSeek-V3/V2 (MLA + MoE) against transformers (fp32, eager): same greedy tokens, prefill
logits within 1e-3, with prefix-cache hits and chunked prefill; FP8 block checkpoints against
the same weights dequantized; MTP layers skipped; MLA pages through the PD hooks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.kv import KVLayout
from engine.llm import LLM
from tests.test_engine_oracle import (
    GREEDY,
    assert_matches_hf,
    assert_pages_released,
    new_llm,
    random_prompts,
)
from tests.test_engine_pd import run_pd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 129280
# DeepSeek-V2's YaRN cos/sin factor differs from 1 when mscale != mscale_all_dim
YARN_MSCALE = {
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}
VARIANTS = [
    # q_lora, interleaved rope, V3 YaRN (softmax mscale), 1 dense + 2 MoE layers, 4 expert groups
    pytest.param(("deepseek_v3", {"layers": 3}), id="v3"),
    pytest.param(
        (
            "deepseek_v3",
            {
                "layers": 3,
                "rope_scaling": YARN_MSCALE,
                "config_overrides": {"q_lora_rank": None, "rope_interleave": False},
            },
        ),
        id="v3-no-q-lora-neox-rope",
    ),
    # softmax scores, group_limited_greedy, two shared experts
    pytest.param(("deepseek_v2", {"layers": 2}), id="v2"),
]


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request, make_tiny) -> Path:
    arch, kw = request.param
    return make_tiny(arch, "deepseek", **kw)


@pytest.fixture(scope="module")
def v3(make_tiny) -> Path:
    return make_tiny("deepseek_v3", "deepseek", layers=3)


def test_batch_matches_transformers(tiny: Path) -> None:
    llm = new_llm(tiny)
    assert llm.engine.pool.layout.kind == "mla"
    prompts = random_prompts([1, 7, 33, 150], VOCAB)
    outs = llm.generate(prompts, GREEDY)
    assert_matches_hf(tiny, prompts, outs)
    assert_pages_released(llm)


def test_chunked_prefill_matches_transformers(tiny: Path) -> None:
    llm = new_llm(tiny, chunk_size=24, max_batch_tokens=40)
    prompts = random_prompts([5, 33, 150], VOCAB, seed=1)
    outs = llm.generate(prompts, GREEDY)
    assert_matches_hf(tiny, prompts, outs)
    assert_pages_released(llm)


def test_prefix_cache_hits_match_transformers(tiny: Path) -> None:
    llm = new_llm(tiny)
    shared = random_prompts([60], VOCAB, seed=2)[0]
    prompts = [shared + tail for tail in random_prompts([1, 5, 17], VOCAB, seed=3)]
    first = llm.generate(prompts[:1], GREEDY)
    rest = llm.generate(prompts[1:] + prompts[:1], GREEDY)
    assert_matches_hf(tiny, prompts[:1], first)
    assert_matches_hf(tiny, prompts[1:] + prompts[:1], rest)
    assert first[0].cached_tokens == 0
    assert all(o.cached_tokens >= 56 for o in rest)
    assert_pages_released(llm)


def test_prefill_then_decode_moves_mla_pages(v3: Path) -> None:
    prefill, decode = new_llm(v3, chunk_size=40), new_llm(v3, enable_prefix_cache=False)
    assert len(prefill.engine.pool.buffers()) == 3  # one latent buffer per layer
    prompts = random_prompts([1, 9, 17, 100], VOCAB, seed=7)
    outs = run_pd(prefill.engine, decode.engine, prompts, GREEDY)
    assert_matches_hf(v3, prompts, outs)
    assert_pages_released(prefill)
    assert_pages_released(decode)


def test_mla_pool_holds_latent_plus_rope_key(v3: Path) -> None:
    layout = new_llm(v3, max_total_tokens=64).engine.pool.layout
    assert (layout.kind, layout.kv_lora_rank, layout.rope_dim) == ("mla", 32, 8)
    assert layout.bytes_per_token == 3 * (32 + 8) * 4
    mha = KVLayout.mha(num_layers=3, num_kv_heads=4, head_dim=64 // 4)  # hidden 64, 4 heads
    assert mha.bytes_per_token == 3 * 2 * 64 * 4
    assert mha.bytes_per_token / layout.bytes_per_token == pytest.approx(3.2)


def test_bfloat16_keeps_the_correction_bias_in_float32(v3: Path) -> None:
    llm = LLM(str(v3), dtype="bfloat16", page_size=4, max_total_tokens=1024)
    router = llm.engine.runner.model.layers[1].mlp.gate
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert llm.engine.runner.model.rotary.inv_freq.dtype == torch.float32
    out = llm.generate(random_prompts([20], VOCAB, seed=4), GREEDY)[0]
    assert len(out.token_ids) == GREEDY.max_tokens


# --- FP8 and multi-token prediction ------------------------------------------------------------


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The oracle: the FP8 checkpoint dequantized tile by tile into a float32 checkpoint that
    transformers loads like any other (written independently of engine.weights)."""
    config = json.loads((src / "config.json").read_text())
    rows, cols = config.pop("quantization_config")["weight_block_size"]
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype != torch.float8_e4m3fn:
            out[name] = tensor
            continue
        scale, weight = tensors[f"{name}_scale_inv"], tensor.float()
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                weight[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] *= scale[i, j]
        out[name] = weight
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy(path, dst / path.name)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"mtp_layers": 1}, id="block128-mtp"),  # as released: one tile per tiny matrix
        pytest.param({"fp8_block": (16, 16)}, id="block16"),  # many tiles, partial edge tiles
    ],
)
def test_fp8_checkpoint_matches_dequantized_transformers(make_tiny, tmp_path, kw) -> None:
    path = make_tiny("deepseek_v3", "deepseek", layers=3, fp8=True, **kw)
    block = list(kw.get("fp8_block", (128, 128)))
    assert json.loads((path / "config.json").read_text())["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": block,
    }
    tensors = load_file(str(path / "model.safetensors"))
    kv_a = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert tensors[kv_a].dtype == torch.float8_e4m3fn and tensors[kv_a].shape == (40, 64)
    assert tensors[f"{kv_a}_scale_inv"].shape == (-(-40 // block[0]), -(-64 // block[1]))
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # router stays
    assert any(n.startswith("model.layers.3.") for n in tensors) == ("mtp_layers" in kw)
    llm = new_llm(path)
    assert len(llm.engine.runner.model.layers) == 3  # MTP layer 3 skipped
    prompts = random_prompts([7, 40], VOCAB, seed=5)
    outs = llm.generate(prompts, GREEDY)
    assert_matches_hf(dequantized_copy(path, tmp_path / "dequantized"), prompts, outs)
    assert_pages_released(llm)


def test_make_model_cli_writes_fp8_deepseek(tmp_path) -> None:
    from cluster.cli import main

    assert main(["make-model", "--arch", "deepseek_v3", "--out", str(tmp_path), "--fp8"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["vocab_size"] == VOCAB  # the DeepSeek tokenizer is the arch's default
    assert config["bos_token_id"] == 0 and (tmp_path / "tokenizer.json").is_file()
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.1.mlp.experts.7.down_proj.weight"].dtype == torch.float8_e4m3fn
