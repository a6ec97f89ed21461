"""DeepSeek pieces one at a time: MoE routing (against transformers' routers too), config.json
parsing (v4 and v5 keys), YaRN rope, FP8 block dequantization, and the MLA attention entry point
against plain decompressed attention.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from engine.arch_config import MoEConfig
from engine.config import ModelConfig
from engine.kv import KVLayout, PagePool
from engine.layers.attention import create_backend
from engine.layers.attention.base import AttentionBatch
from engine.layers.moe import select_experts
from engine.layers.rotary import RotaryEmbedding
from engine.runner import kv_layout
from engine.weights import dequantize_block_fp8, dequantize_fp8, iter_weights, read

V3_ROUTING = MoEConfig(
    num_experts=8,
    top_k=2,
    intermediate_size=16,
    num_shared_experts=1,
    first_dense_layers=1,
    layer_freq=1,
    scoring="sigmoid",
    topk_method="noaux_tc",
    num_groups=4,
    topk_groups=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
)


def logit(p: list[float]) -> torch.Tensor:
    t = torch.tensor([p])
    return torch.log(t / (1 - t))


# --- routing -----------------------------------------------------------------------------------


def test_grouped_topk_picks_from_the_best_groups_only() -> None:
    # groups of 2: g0 holds the single best expert, but g1 and g2 have the best top-2 sums
    scores = [0.95, 0.01, 0.6, 0.59, 0.55, 0.54, 0.1, 0.1]
    weights, ids = select_experts(logit(scores), None, V3_ROUTING)
    assert sorted(ids[0].tolist()) == [2, 3]
    ungrouped = dataclasses.replace(V3_ROUTING, num_groups=1, topk_groups=1)
    assert sorted(select_experts(logit(scores), None, ungrouped)[1][0].tolist()) == [0, 2]
    assert weights.sum().item() == pytest.approx(2.5)


def test_correction_bias_changes_the_choice_not_the_weights() -> None:
    scores = [0.9, 0.8, 0.3, 0.2, 0.7, 0.6, 0.5, 0.4]
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    weights, ids = select_experts(logit(scores), bias, V3_ROUTING)
    chosen = dict(zip(ids[0].tolist(), weights[0].tolist()))
    assert set(chosen) == {7, 0}  # group 3 wins through the bias, then the best expert
    assert chosen[7] == pytest.approx(2.5 * 0.4 / (0.4 + 0.9))  # unbiased score
    assert chosen[0] == pytest.approx(2.5 * 0.9 / (0.4 + 0.9))


def test_norm_topk_prob_and_scaling() -> None:
    scores = [0.9, 0.8, 0.3, 0.2, 0.7, 0.6, 0.5, 0.4]
    raw = dataclasses.replace(V3_ROUTING, norm_topk_prob=False, routed_scaling_factor=2.0)
    weights, ids = select_experts(logit(scores), None, raw)
    assert sorted(ids[0].tolist()) == [0, 1]
    assert sorted(weights[0].tolist()) == pytest.approx([1.6, 1.8])
    normed, _ = select_experts(logit(scores), None, V3_ROUTING)
    assert sorted(normed[0].tolist()) == pytest.approx([2.5 * 0.8 / 1.7, 2.5 * 0.9 / 1.7])


def test_v2_groups_rank_by_their_best_expert() -> None:
    v2 = dataclasses.replace(
        V3_ROUTING, scoring="softmax", topk_method="group_limited_greedy", norm_topk_prob=False
    )
    # group 0 has the best expert but the worst top-2 sum next to groups 1 and 2
    logits = torch.tensor([[2.5, -9.0, 2.0, 1.95, 1.9, 1.85, 0.0, 0.0]])
    weights, ids = select_experts(logits, None, v2)
    assert sorted(ids[0].tolist()) == [0, 2]  # groups 0 (max 2.5) and 1 (max 2.0)
    probs = logits.softmax(-1)[0]
    assert sorted(weights[0].tolist()) == pytest.approx(sorted([2.5 * probs[0], 2.5 * probs[2]]))
    by_sum = dataclasses.replace(v2, topk_method="noaux_tc")
    assert sorted(select_experts(logits, None, by_sum)[1][0].tolist()) == [2, 3]
    greedy = dataclasses.replace(v2, topk_method="greedy")
    assert sorted(select_experts(logits, None, greedy)[1][0].tolist()) == [0, 2]


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_routing_matches_transformers_routers(version: str) -> None:
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    sizes = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4)
    sizes.update(topk_group=2, routed_scaling_factor=2.5)
    if version == "v3":
        hf = DeepseekV3TopkRouter(DeepseekV3Config(**sizes, norm_topk_prob=True))
        cfg = dataclasses.replace(V3_ROUTING, num_experts=16, top_k=4)
    else:
        hf_cfg = DeepseekV2Config(
            **sizes, topk_method="group_limited_greedy", num_attention_heads=4
        )
        hf = DeepseekV2TopkRouter(hf_cfg)
        cfg = MoEConfig.from_hf(hf_cfg.to_dict(), "deepseek_v2")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, 32, generator=gen) / 4)
        if version == "v3":
            hf.e_score_correction_bias.copy_(0.1 * torch.randn(16, generator=gen))
    x = torch.randn(64, 32, generator=gen)
    _, hf_weights, hf_ids = hf(x)
    bias = getattr(hf, "e_score_correction_bias", None)
    weights, ids = select_experts(torch.nn.functional.linear(x, hf.weight), bias, cfg)
    for a, wa, b, wb in zip(ids, weights, hf_ids, hf_weights):
        assert dict(zip(a.tolist(), wa.tolist())) == pytest.approx(
            dict(zip(b.tolist(), wb.tolist()))
        )


def test_moe_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="equal groups"):
        dataclasses.replace(V3_ROUTING, num_groups=3)
    with pytest.raises(ValueError, match="raise topk_group"):
        dataclasses.replace(V3_ROUTING, top_k=5)
    with pytest.raises(ValueError, match="scoring_func"):
        dataclasses.replace(V3_ROUTING, scoring="relu")


def test_dense_and_moe_layers_follow_first_k_dense_and_freq() -> None:
    every_other = dataclasses.replace(V3_ROUTING, first_dense_layers=1, layer_freq=2)
    assert [every_other.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]
    from engine.layers.mlp import GatedMLP
    from engine.layers.moe import MoE
    from engine.models.deepseek_v3 import DeepseekV3ForCausalLM

    cfg = ModelConfig.from_hf({**tiny_v3_config(), "num_hidden_layers": 4, "moe_layer_freq": 2})
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    kinds = [type(layer.mlp) for layer in model.layers]
    assert kinds == [GatedMLP, GatedMLP, MoE, GatedMLP]


# --- config.json ---------------------------------------------------------------------------------


def tiny_v3_config() -> dict:
    """A DeepSeek-V3 config.json with v4 keys (rope_scaling with `type`), tiny sizes."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        "torch_dtype": "bfloat16",
    }


def test_v4_and_v5_config_keys_agree() -> None:
    v4 = tiny_v3_config()
    v5 = {k: v for k, v in v4.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    rope = {k: v for k, v in v4["rope_scaling"].items() if k != "type"}
    v5.update(rope_parameters={**rope, "rope_type": "yarn", "rope_theta": 10000}, dtype="bfloat16")
    a, b = ModelConfig.from_hf(v4), ModelConfig.from_hf(v5)
    assert (a.family, a.mla, a.moe, a.fp8) == (b.family, b.mla, b.moe, b.fp8)
    assert a.family == "deepseek_v3" and a.fp8.weight_block == (128, 128)
    assert a.head_dim == 24 and a.moe.scoring == "sigmoid" and a.moe.num_groups == 4
    mscale = 0.1 * math.log(40) + 1
    assert a.softmax_scale == pytest.approx(24**-0.5 * mscale**2)
    assert b.softmax_scale == pytest.approx(a.softmax_scale)


def test_kv_layout_is_mla_and_unsupported_quantization_is_named() -> None:
    layout = kv_layout(ModelConfig.from_hf(tiny_v3_config()), torch.bfloat16)
    assert layout == KVLayout.mla(3, 32, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="quantization method 'awq'"):
        ModelConfig.from_hf({**tiny_v3_config(), "quantization_config": {"quant_method": "awq"}})


@pytest.mark.parametrize("extra", [{}, {"mscale": 0.707}, {"factor": None}, {"truncate": False}])
def test_yarn_rope_matches_transformers(extra: dict) -> None:
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {**tiny_v3_config()["rope_scaling"], "rope_type": "yarn", **extra}
    rope.pop("type")
    hf_cfg = DeepseekV3Config(qk_rope_head_dim=8, max_position_embeddings=163840)
    hf_cfg.rope_parameters = {**rope, "rope_theta": 10000.0}
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours = RotaryEmbedding(8, 10000.0, rope, max_positions=163840)
    assert torch.equal(ours.inv_freq, inv_freq)
    assert ours.attention_factor == pytest.approx(factor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}])  # fmt: skip
def test_rope_frequencies_stay_float32_when_the_model_is_cast(dtype, scaling) -> None:
    """A model cast to bf16/fp16 keeps its rope frequencies float32: rounded to 8 bits of
    mantissa they turn a position's angle wrong within a few hundred tokens."""
    exact = RotaryEmbedding(128, 500000.0, scaling)
    cast = RotaryEmbedding(128, 500000.0, scaling).to(dtype)
    assert cast.inv_freq.dtype == torch.float32
    assert torch.equal(cast.inv_freq, exact.inv_freq)
    positions = torch.tensor([0, 255, 4095, 131071])
    for got, want in zip(cast.cos_sin(positions, dtype), exact.cos_sin(positions, dtype)):
        assert torch.equal(got, want)


# --- FP8 -----------------------------------------------------------------------------------------


def test_block_dequantization_handles_partial_tiles() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 70, generator=gen).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 5, generator=gen)
    expected = weight.float().clone()
    for i in range(3):
        for j in range(5):
            expected[i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16] *= scale[i, j]
    assert torch.equal(dequantize_block_fp8(weight, scale, (16, 16), "w"), expected)
    stacked = dequantize_block_fp8(weight[None].expand(2, -1, -1), scale[None], (16, 16), "w")
    assert torch.equal(stacked[1], expected)
    with pytest.raises(ValueError, match="weight_block_size"):
        dequantize_block_fp8(weight, scale, (128, 128), "w")


def test_fp8_stream_pairs_weights_and_scales_in_any_order() -> None:
    w = torch.ones(4, 4).to(torch.float8_e4m3fn)
    s = torch.full((1, 1), 0.5)
    stream = [("a.weight_scale_inv", s), ("norm.weight", torch.ones(4)), ("a.weight", w)]
    stream += [("b.weight", w), ("b.weight_scale_inv", s)]
    out = dict(dequantize_fp8(stream, (128, 128)))
    assert sorted(out) == ["a.weight", "b.weight", "norm.weight"]
    assert torch.equal(read(out["a.weight"]), torch.full((4, 4), 0.5))
    with pytest.raises(ValueError, match=r"'c\.weight' has no _scale_inv"):
        dict(dequantize_fp8([("c.weight", w)], (128, 128)))


def test_fp8_tensors_without_quantization_config_are_refused(make_tiny, tmp_path) -> None:
    path = make_tiny("deepseek_v3", "deepseek", layers=3, fp8=True, mtp_layers=1)
    for file in path.iterdir():
        shutil.copy(file, tmp_path / file.name)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no quantization_config"):
        dict(iter_weights(tmp_path, ModelConfig.load(tmp_path).fp8))


# --- the MLA attention entry point ---------------------------------------------------------------


def test_forward_mla_equals_decompressed_attention() -> None:
    """A decode row and an extend with a cached prefix in one step, against MHA over the
    decompressed keys and values (what a new backend's forward_mla must also return)."""
    heads, rank, rope, nope, vdim, scale = 4, 32, 8, 16, 16, 0.3
    gen = torch.Generator().manual_seed(0)
    pool = PagePool(KVLayout.mla(1, rank, rope), num_pages=16, page_size=4)
    backend = create_backend("torch", pool, scale)
    w_uk = torch.randn(heads, nope, rank, generator=gen) / 4
    w_uv = torch.randn(heads, vdim, rank, generator=gen) / 4
    latent = torch.randn(20, rank, generator=gen)  # request A: 7 tokens, request B: 13
    k_rope = torch.randn(20, rope, generator=gen)
    q_nope = torch.randn(20, heads, nope, generator=gen)
    q_rope = torch.randn(20, heads, rope, generator=gen)
    tables = [[1, 2], [5, 6, 7, 8]]
    steps = [([6, 10], [6, 10], [slice(0, 6), slice(7, 17)]), ([1, 3], [7, 13], [6, slice(17, 20)])]
    for q_lens, kv_lens, rows in steps:
        idx = torch.cat([torch.arange(20)[r].reshape(-1) for r in rows])
        meta = backend.prepare(AttentionBatch(q_lens, kv_lens, tables, 4))
        q_latent = torch.einsum("thd,hdr->thr", q_nope[idx], w_uk)
        out = backend.forward_mla(q_latent, q_rope[idx], latent[idx], k_rope[idx], 0, meta)
        got = torch.einsum("thr,hvr->thv", out, w_uv)
    want = decompressed_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale)
    assert torch.allclose(got, torch.cat([want[6:7], want[17:20]]), atol=1e-5)


def decompressed_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale):
    """Causal MHA per request (A: rows 0-6, B: rows 7-19) with k = [W_UK c | k_rope], v = W_UV c."""
    outs = []
    for rows in (slice(0, 7), slice(7, 20)):
        k_nope = torch.einsum("hdr,tr->thd", w_uk, latent[rows])
        keys = torch.cat([k_nope, k_rope[rows, None].expand(-1, q_nope.shape[1], -1)], -1)
        values = torch.einsum("hvr,tr->thv", w_uv, latent[rows])
        q = torch.cat([q_nope[rows], q_rope[rows]], -1)
        att = torch.einsum("qhd,khd->hqk", q, keys) * scale
        n = att.shape[-1]
        att = att.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        outs.append(torch.einsum("hqk,khv->qhv", att.softmax(-1), values))
    return torch.cat(outs)
