"""The native bfloat16 RMSNorm and SiLU-and-mul (engine/kernels/norm_act.py) against torch's
ops as the reference implementations compute them, and where the modules keep torch's."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from engine.kernels.build import cpu_flags
from engine.kernels.norm_act import NormAct, build_norm_act
from engine.layers.mlp import GatedMLP, use_norm_act
from engine.layers.norm import RMSNorm
from engine.parallel.group import Parallel

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def kernel() -> NormAct:
    if "avx512f" not in cpu_flags():
        pytest.skip("needs AVX-512: this CPU lacks avx512f (torch's ops serve instead)")
    built = build_norm_act(threads=2)
    assert built is not None, "an AVX-512 CPU must get the kernels (gcc?)"
    return built


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("shape", [(1, 16), (7, 1024), (3, 4, 64), (2, 7168)])
def test_rms_norm_equals_the_reference_but_for_rare_last_step_roundings(
    kernel: NormAct, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(BF16)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(BF16)
    assert kernel.serves_norm(x, weight)
    got, want = kernel.rms_norm(x, weight, 1e-6), hf_rms_norm(x, weight, 1e-6)
    assert got.shape == want.shape and got.dtype == BF16
    # NOTE: the squares are summed in another order than torch's mean: a few outputs round
    # to the neighbouring bfloat16, never further
    differ = got != want
    assert differ.float().mean() < 1e-3
    step = want.float().abs() * 2.0**-7
    assert ((got.float() - want.float()).abs() <= step + 1e-30).all()


def test_silu_mul_equals_torch_bit_for_bit(kernel: NormAct) -> None:
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(33, 2 * 3072, generator=gen) * 6).to(BF16)
    gate_up[0, :16] = torch.tensor([0, -0.0, 1e-30, -1e-30, 88, -88, 200, -200] * 2).to(BF16)
    gate, up = gate_up.chunk(2, -1)
    assert kernel.serves_silu_mul(gate_up)
    assert torch.equal(kernel.silu_mul(gate_up), F.silu(gate) * up)


def test_the_modules_take_the_kernel_where_it_serves_and_torch_elsewhere(
    kernel: NormAct,
) -> None:
    norm, odd = RMSNorm(64, 1e-5).to(BF16), RMSNorm(24, 1e-5).to(BF16)
    mlp = GatedMLP(64, 128, Parallel.single()).to(BF16)
    for module in (norm, odd, mlp):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(5, 64).to(BF16)
    torch_norm, torch_mlp = norm(x), mlp(x)
    model = torch.nn.ModuleList([norm, odd, mlp])
    use_norm_act(model, kernel)
    assert norm.kernel is kernel and odd.kernel is kernel and mlp.act_kernel is kernel
    assert torch.equal(mlp(x), torch_mlp)  # the kernel's SiLU-and-mul is torch's, bit for bit
    torch.testing.assert_close(norm(x), torch_norm, rtol=2**-7, atol=0)
    # torch's ops where the kernel does not serve: a width not a multiple of 16, a float32
    # model, a strided view
    y = torch.randn(5, 24).to(BF16)
    assert not kernel.serves_norm(y, odd.weight)
    assert torch.equal(odd(y), hf_rms_norm(y, odd.weight, 1e-5))
    assert not kernel.serves_norm(x.float(), norm.weight.float())
    assert not kernel.serves_norm(torch.randn(5, 128).to(BF16)[:, :64], norm.weight)
    use_norm_act(model, None)
    assert norm.kernel is None and mlp.act_kernel is None
