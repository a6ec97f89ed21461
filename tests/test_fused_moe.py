"""The Triton fused MoE (engine/kernels/triton_moe.py) equals the torch MoE (`RoutedExperts`),
run on CPU tensors through Triton's interpreter at tiny shapes: bf16/fp16/fp32 weights, FP8
block-scaled weights, ragged expert loads, top-1/top-2 and DeepSeek's grouped routing."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'triton==3.9.*')")

from engine.arch_config import MoEConfig
from engine.kernels.triton_moe import (
    BlockFp8,
    MoEBlocks,
    align_pairs,
    fused_expert_rows,
    fused_moe,
    stack_block_fp8,
)
from engine.layers.moe import RoutedExperts, select_experts
from engine.parallel.group import Parallel
from engine.weights import Fp8Tensor, dequantize_block_fp8
from modelgen.fp8 import quantize_block_fp8

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="these tests run the kernels on CPU tensors (TRITON_INTERPRET=1)",
)

HIDDEN, INTER, EXPERTS = 40, 24, 6  # not multiples of the 16-wide blocks: ragged edges
BLOCKS = MoEBlocks(m=16, n=16, k=16)  # the smallest legal tile: several blocks per dimension
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def routing(top_k: int, experts: int = EXPERTS) -> MoEConfig:
    return MoEConfig(
        num_experts=experts,
        top_k=top_k,
        intermediate_size=INTER,
        num_shared_experts=0,
        first_dense_layers=0,
        layer_freq=1,
        scoring="sigmoid",
        topk_method="noaux_tc",
        num_groups=2,
        topk_groups=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )


def torch_experts(top_k: int, dtype: torch.dtype, seed: int = 0) -> RoutedExperts:
    gen = torch.Generator().manual_seed(seed)
    experts = RoutedExperts(HIDDEN, routing(top_k), Parallel.single())
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) / 6)
        experts.down_proj.copy_(torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / 5)
    return experts.to(dtype)


def ragged_ids(num_tokens: int, top_k: int) -> torch.Tensor:
    """Expert 1 takes most pairs, experts 2 and 4 none, the rest a few."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.full((num_tokens, top_k), 1)
    if top_k > 1:
        ids[:, 1] = torch.tensor([0, 3, 5])[torch.randint(0, 3, (num_tokens,), generator=gen)]
    ids[::4, 0] = 5 if top_k == 1 else 0
    return ids


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1.0), f"max error {err} (max |value| {scale})"


def test_align_pairs_groups_each_expert_in_padded_blocks() -> None:
    ids = ragged_ids(13, 2)
    aligned = align_pairs(ids, EXPERTS, 16)
    num_pairs, used = ids.numel(), int(aligned.num_padded)
    pairs = aligned.pairs[:used].view(-1, 16)
    real = pairs < num_pairs
    assert sorted(pairs[real].tolist()) == list(range(num_pairs))  # every pair once
    assert (aligned.pairs[used:] == num_pairs).all()
    experts = aligned.block_experts[: len(pairs)]
    counts = torch.bincount(ids.flatten(), minlength=EXPERTS)
    assert experts.tolist() == [e for e in range(EXPERTS) for _ in range(-(-counts[e] // 16))]
    for block, expert in zip(pairs, experts):  # a block holds one expert's pairs, in order
        picked = block[block < num_pairs].long()
        assert (ids.flatten()[picked] == expert).all() and picked.tolist() == sorted(picked)


def test_align_pairs_leaves_pairs_of_no_expert_out() -> None:
    ids = ragged_ids(13, 2)
    ids[1::3, 1] = EXPERTS  # no expert: the fixed-capacity EP exchange's masked picks
    aligned = align_pairs(ids, EXPERTS, 16)
    used, flat = int(aligned.num_padded), ids.flatten()
    placed = aligned.pairs[:used]
    placed = placed[placed < ids.numel()].long()
    assert sorted(placed.tolist()) == (flat < EXPERTS).nonzero().flatten().tolist()
    counts = torch.bincount(flat[flat < EXPERTS], minlength=EXPERTS)
    assert used == int(sum(-(-c // 16) * 16 for c in counts.tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_picks_of_no_expert_add_nothing_fused_or_torch(dtype: torch.dtype) -> None:
    """`combine_local`'s ids of `local_experts`: the pairs another rank computes."""
    experts = torch_experts(2, dtype)
    x = torch.randn(13, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)
    ids = ragged_ids(13, 2)
    weights = torch.rand(13, 2, generator=torch.Generator().manual_seed(3))
    skipped = ids.clone()
    skipped[::2, 1] = EXPERTS
    skipped[5] = EXPERTS  # a row with no expert here at all: zeros
    kept = torch.where(skipped < EXPERTS, weights, 0.0)
    with torch.no_grad():
        want = experts(x, kept, ids)  # the same sums, the skipped picks weighted 0
        by_torch = experts.combine_local(x, weights, skipped)
        experts.use_fused = True
        by_fused = experts.combine_local(x, weights, skipped)
    assert_close(by_torch, want, dtype)
    assert_close(by_fused, want, dtype)
    assert not by_fused[5].any() and not by_torch[5].any()


@pytest.mark.parametrize(
    ("dtype", "top_k"),
    [(torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 2), (torch.float16, 2)],
    ids=["fp32-top1", "fp32-top2", "bf16-top2", "fp16-top2"],
)
def test_fused_moe_equals_torch_moe_with_ragged_loads(dtype: torch.dtype, top_k: int) -> None:
    experts = torch_experts(top_k, dtype)
    x = torch.randn(13, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)
    ids = ragged_ids(13, top_k)
    weights = torch.rand(13, top_k, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = experts(x, weights, ids)
        got = fused_moe(x, experts.gate_up_proj, experts.down_proj, weights, ids, BLOCKS)
    assert_close(got, want, dtype)


def test_fused_moe_with_deepseek_grouped_routing_and_the_layer_switch() -> None:
    experts = torch_experts(2, torch.bfloat16, seed=4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(21, HIDDEN, generator=gen).bfloat16()
    bias = torch.randn(EXPERTS, generator=gen) * 0.1
    weights, ids = select_experts(torch.randn(21, EXPERTS, generator=gen), bias, routing(2))
    with torch.no_grad():
        want = experts(x, weights, ids)
        experts.use_fused = True  # the layer's own switch takes the default tile
        got = experts(x, weights, ids)
    assert_close(got, want, torch.bfloat16)


def test_chunks_of_tokens_give_the_same_output() -> None:
    experts = torch_experts(2, torch.float32)
    x = torch.randn(12, HIDDEN, generator=torch.Generator().manual_seed(6))
    ids, weights = ragged_ids(12, 2), torch.rand(12, 2, generator=torch.Generator().manual_seed(7))
    w = experts.gate_up_proj.detach(), experts.down_proj.detach()
    whole = fused_moe(x, *w, weights, ids, BLOCKS)
    chunked = fused_moe(x, *w, weights, ids, BLOCKS, chunk_tokens=7)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_expert_rows_equal_the_expert_parallel_compute() -> None:
    experts = torch_experts(1, torch.float32)
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(8))
    local_ids = torch.tensor([3, 3, 0, 5, 3, 3, 1, 3, 0])
    w = experts.gate_up_proj.detach(), experts.down_proj.detach()
    with torch.no_grad():
        want = experts.compute(x, local_ids)
    assert_close(fused_expert_rows(x, *w, local_ids, BLOCKS), want, torch.float32)
    experts.use_fused = True  # the layer's switch routes compute too
    with torch.no_grad():
        assert_close(experts.compute(x, local_ids), want, torch.float32)
    empty = fused_expert_rows(x[:0], *w, local_ids[:0], BLOCKS)  # an idle EP rank's share
    assert empty.shape == (0, HIDDEN)


FP8_BLOCK = (16, 16)  # DeepSeek-V3 ships 128x128; 16 gives these shapes several, partial ones


def fp8_checkpoint(seed: int) -> tuple[list[list[Fp8Tensor]], list[list[Fp8Tensor]]]:
    """Per-expert [gate, up] and [down] as the loader yields them: float8 + weight_scale_inv."""
    gen = torch.Generator().manual_seed(seed)

    def quantized(rows: int, cols: int, name: str) -> Fp8Tensor:
        weight, scale_inv = quantize_block_fp8(
            torch.randn(rows, cols, generator=gen) / 5, FP8_BLOCK
        )
        return Fp8Tensor(weight, scale_inv, FP8_BLOCK, name)

    gate_up = [
        [quantized(INTER, HIDDEN, "gate"), quantized(INTER, HIDDEN, "up")] for _ in range(EXPERTS)
    ]
    down = [[quantized(HIDDEN, INTER, "down")] for _ in range(EXPERTS)]
    return gate_up, down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_block_weights_equal_the_torch_moe_over_dequantized_weights(dtype: torch.dtype) -> None:
    gate_up, down = fp8_checkpoint(seed=9)
    fp8_gate_up, fp8_down = stack_block_fp8(gate_up), stack_block_fp8(down)
    assert fp8_gate_up.weight.dtype == torch.float8_e4m3fn
    assert fp8_gate_up.scale.shape == (EXPERTS, 2 * 2, 3)  # each half: ceil(24/16) row blocks

    def dequantized(parts: list[Fp8Tensor]) -> torch.Tensor:
        return torch.cat(
            [dequantize_block_fp8(p.weight, p.scale_inv, FP8_BLOCK, p.name) for p in parts]
        )

    experts = RoutedExperts(HIDDEN, routing(2), Parallel.single())
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.stack([dequantized(p) for p in gate_up]))
        experts.down_proj.copy_(torch.stack([dequantized(p) for p in down]))
    torch.testing.assert_close(fp8_gate_up.dequantize(), experts.gate_up_proj.detach())
    experts = experts.to(dtype)
    x = torch.randn(13, HIDDEN, generator=torch.Generator().manual_seed(10)).to(dtype)
    ids = ragged_ids(13, 2)
    weights = torch.rand(13, 2, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = experts(x, weights, ids)
    assert_close(fused_moe(x, fp8_gate_up, fp8_down, weights, ids, BLOCKS), want, dtype)


def test_bad_inputs_name_the_fix() -> None:
    gate_up, down = fp8_checkpoint(seed=12)
    fp8_gate_up, fp8_down = stack_block_fp8(gate_up), stack_block_fp8(down)
    with pytest.raises(ValueError, match="weight_block_size"):
        BlockFp8(fp8_down.weight, fp8_down.scale[:, :1], FP8_BLOCK)
    per_tensor = Fp8Tensor(down[0][0].weight, torch.ones(()), None, "experts.0.down_proj.weight")
    with pytest.raises(ValueError, match="one scale per tensor"):
        stack_block_fp8([[per_tensor]])
    x, ids, weights = torch.randn(2, HIDDEN), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    with pytest.raises(ValueError, match="BLOCK_K 32 must divide"):
        fused_moe(x, fp8_gate_up, fp8_down, weights, ids, MoEBlocks(16, 16, 32))
    with pytest.raises(ValueError, match=r"down \[E, H, I\]; got H=40"):
        fused_moe(x, fp8_gate_up, fp8_gate_up, weights, ids)
    with pytest.raises(TypeError, match="both projections"):
        fused_moe(x, fp8_gate_up, torch.zeros(EXPERTS, HIDDEN, INTER), weights, ids)


def test_fp8_checkpoint_experts_stay_fp8_and_equal_the_dequantized_experts(
    make_tiny, monkeypatch
) -> None:
    """A GPU build (`fp8_experts_on_device`, forced here): the routed experts are FP8 from
    their construction on (no stacked copy is ever made, not even empty-shaped), load with
    their block scales, and each MoE layer computes what the dequantizing load computes."""
    from engine.config import ModelConfig
    from engine.layers.moe import MoE
    from engine.models import deepseek_v3
    from engine.models.deepseek_v3 import DeepseekV3ForCausalLM
    from engine.weights import iter_weights

    path = make_tiny("deepseek_v3", "deepseek", layers=3, fp8=True, fp8_block=(16, 16))
    cfg = ModelConfig.load(path)
    ref = DeepseekV3ForCausalLM(cfg)
    ref.load_weights(iter_weights(path, cfg.fp8))
    monkeypatch.setattr(deepseek_v3, "fp8_experts_on_device", lambda tp: True)
    kept = DeepseekV3ForCausalLM(cfg)
    built = [m.mlp.experts for m in kept.layers if isinstance(m.mlp, MoE)]
    assert built and all(e.use_fused and e.gate_up_proj.numel() == 0 for e in built)
    kept.load_weights(iter_weights(path, cfg.fp8))
    x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    moe_layers = [(a.mlp, b.mlp) for a, b in zip(ref.layers, kept.layers) if isinstance(a.mlp, MoE)]
    assert moe_layers
    for want, got in moe_layers:
        experts = got.experts
        assert experts.fp8 is not None and experts.gate_up_proj.numel() == 0
        assert experts.fp8[0].weight.dtype == torch.float8_e4m3fn
        with torch.inference_mode():
            a, b = want(x), got(x)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_fp8_experts_refuse_a_sliced_intermediate() -> None:
    experts = RoutedExperts(HIDDEN, routing(2), Parallel(rank=0, size=2))
    with pytest.raises(ValueError, match="ep_size = tp_size"):
        experts.keep_fp8()
