"""The int8 greedy LM head returns exactly the float kernel's argmax, whatever the input.

Each test also runs the torch path that stands in for it on a CPU without AVX-512 (the [torch]
cases): the model's float32 logits and the sampler's `argmax_rows`, against torch's argmax.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels.build import cpu_flags
from engine.kernels.lm_head import build_lm_head, lm_head_unsupported
from engine.kernels.lm_head_q8 import Q8_CPU_FLAGS, q8_library
from tests.test_kernels import TorchLMHead

PATHS = ["int8", "torch"]


def _heads(path: str, weight: torch.Tensor, threads: int = 2):
    """(the head, the float argmax it must equal): the int8 pass against the same head's float
    kernel, or torch's path against torch's argmax of its logits; skips the int8 pass where
    the CPU lacks AVX-512 (VNNI, BF16), saying which flags."""
    if path == "torch":
        head = TorchLMHead(weight)
        return head, lambda x: head(x).argmax(dim=-1)
    reason = lm_head_unsupported(weight)
    missing = [f for f in Q8_CPU_FLAGS if f not in cpu_flags()]
    if reason is not None or missing:
        pytest.skip(f"needs AVX-512 with VNNI: {reason or 'this CPU lacks ' + ', '.join(missing)}")
    assert q8_library() is not None
    head = build_lm_head(weight, threads)
    assert head is not None and head.q8 is not None
    q8 = head.q8

    def float_argmax(x: torch.Tensor) -> torch.Tensor:
        head.q8 = None
        try:
            return head.argmax(x)
        finally:
            head.q8 = q8

    return head, float_argmax


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_int8_argmax_equals_float_argmax(path: str, dtype: torch.dtype, threads: int) -> None:
    gen = torch.Generator().manual_seed(threads)
    vocab, hidden = 5000 + 3, 66  # a partial last block; hidden not a multiple of 4
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.05).to(dtype)
    weight[4000:4010] = weight[17]  # exact ties: the first index wins
    head, float_argmax = _heads(path, weight, threads)
    for rows in (1, 2, 3, 7, 16, 21, 40):
        for scale in (1e-3, 1.0, 300.0):
            x = (torch.randn(rows, hidden, generator=gen) * scale).to(dtype)
            if rows > 2:
                x[2] = weight[17] * 40
            got = head.argmax(x)
            assert got.dtype == torch.int64 and got.shape == (rows,)
            assert torch.equal(got, float_argmax(x))
            assert torch.equal(got, head(x).argmax(dim=-1))
            if rows > 2:
                assert got[2].item() == 17


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outlier", [False, True])
def test_int8_argmax_on_hostile_inputs(path: str, dtype: torch.dtype, outlier: bool) -> None:
    """Rows the int8 pass cannot serve fall back to a full float scan, with the same answer:
    zero and non-finite x, thousands of exact ties (one thread's candidate list overflows
    while the other's holds a near miss), near-ties closer than int8 can tell apart, and an
    outlier row that makes the int8 weight coarse for every other row."""
    gen = torch.Generator().manual_seed(0)
    vocab, hidden = 8000, 32
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.05).to(dtype)
    if outlier:
        weight[100] *= 200
    weight[2000:4000] = weight[1]  # 2000 copies of row 1: its vocabulary half overflows...
    weight[6500] = (weight[1].float() * (1 - 2**-9)).to(dtype)  # ... the other has a near miss
    weight[7000] = weight[50]
    weight[7001] = (weight[50].float() * (1 + 2**-12)).to(dtype)  # a near-tie with row 50
    head, float_argmax = _heads(path, weight, threads=2)
    x = torch.randn(9, hidden, generator=gen).to(dtype)
    x[0] = 0
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3] = weight[1] * 30  # the max is row 1, tied 2000 times
    x[4] = weight[50] * 30  # rows 50, 7000 and 7001 within a hair of each other
    x[5] = -weight[100]
    x[6] = weight[100] * 1e-30  # tiny: denormal territory
    got = head.argmax(x)
    assert torch.equal(got, float_argmax(x))
    assert got[3].item() == 1
    finite = [0, 3, 4, 5, 7, 8]
    assert torch.equal(got[finite], head(x[finite]).argmax(dim=-1))


@pytest.mark.parametrize("path", PATHS)
def test_int8_argmax_on_a_real_vocabulary(path: str) -> None:
    """The Qwen-sized vocabulary of the benchmark, many random batches."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(151936, 64, generator=gen) * 0.02
    head, float_argmax = _heads(path, weight)
    for _ in range(20):
        x = torch.randn(16, 64, generator=gen) * 2
        assert torch.equal(head.argmax(x), float_argmax(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_masked_int8_argmax_picks_the_best_allowed_token(dtype: torch.dtype, threads: int) -> None:
    """With a grammar's bitmask, each row's pick is the float argmax over its allowed tokens:
    masks that allow a few tokens, one token, every token, and ties among the allowed."""
    gen = torch.Generator().manual_seed(11)
    vocab, hidden = 3000 + 5, 68
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.05).to(dtype)
    weight[2500] = weight[40]  # a tie between two allowed tokens: the first index wins
    head, _ = _heads("int8", weight, threads)
    words = -(-vocab // 32)
    for rows in (1, 3, 16, 19):
        x = (torch.randn(rows, hidden, generator=gen)).to(dtype)
        x[0] = weight[40] * 30
        keep = torch.rand(rows, vocab, generator=gen) < torch.tensor([0.003, 0.5, 1.0])[
            torch.arange(rows) % 3
        ].unsqueeze(1)
        keep[0] = False
        keep[0, [40, 2500, 7]] = True
        if rows > 3:
            keep[3] = False
            keep[3, vocab - 1] = True  # one allowed token, in the last partial block
        keep[:, 0] |= ~keep.any(dim=1)  # every row allows something
        bits = torch.zeros(rows, words * 32, dtype=torch.int64)
        bits[:, :vocab] = keep.long()
        allowed = (bits.view(rows, words, 32) << torch.arange(32)).sum(-1)
        allowed = torch.where(allowed >= 2**31, allowed - 2**32, allowed).to(torch.int32)
        logits = x.float() @ weight.float().T
        want = logits.masked_fill(~keep, float("-inf")).argmax(dim=-1)
        got = head.argmax(x, allowed)
        close = (logits.gather(1, got[:, None]) - logits.gather(1, want[:, None])).abs()
        assert keep.gather(1, got[:, None]).all(), (rows, got)
        assert torch.equal(got, want) or bool((close < 1e-4).all()), (rows, got, want)
        assert got[0] == 40
        if rows > 3:
            assert got[3] == vocab - 1
