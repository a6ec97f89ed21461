"""Two backends over twin page pools: the same step through `torch` (the reference) and `triton`.

Both pools start with the same random bytes in every slot (so a kernel that reads a slot it
should not, or writes one, shows), and the requests' pages are scattered (non-contiguous, out
of order). A step is given as (new tokens, cached tokens) per request: q_len 1 rows decode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip(
    "triton", reason="the triton backend's tests need triton (pip install -e '.[cpu]')"
)

from engine.kv.pool import KVLayout, PagePool
from engine.layers.attention.base import AttentionBackend, AttentionBatch
from engine.layers.attention.torch_backend import TorchAttention
from engine.layers.attention.triton_backend import TritonAttention, TritonBlocks

SMALL = TritonBlocks(extend_m=16, extend_n=16, decode_n=16, split_tokens=16)
"""Tiles as small as a GPU dot takes, and a decode split every 16 keys: tiny shapes then cross
blocks and splits."""

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Twins:
    """The reference and the Triton backend over pools holding the same bytes."""

    ref: AttentionBackend
    triton: TritonAttention

    def assert_pools_equal(self) -> None:
        for i, (a, b) in enumerate(zip(self.ref.pool.buffers(), self.triton.pool.buffers())):
            assert torch.equal(a, b), f"KV buffer {i} differs from the torch backend's"


def twins(
    layout: KVLayout, batch: AttentionBatch, device: str, blocks: TritonBlocks | None, scale: float
) -> Twins:
    """Pools with a few pages to spare over `batch`'s (spare pages must stay as they were)."""
    pages = sum(len(t) for t in batch.page_tables) + 4
    pools = [PagePool(layout, pages, batch.page_size, device) for _ in range(2)]
    gen = torch.Generator().manual_seed(7)
    for a, b in zip(*(p.buffers() for p in pools)):
        a.copy_(torch.randn(a.shape, generator=gen).to(layout.dtype))
        b.copy_(a)
    return Twins(TorchAttention(pools[0], scale), TritonAttention(pools[1], scale, blocks))


def step_batch(shapes: list[tuple[int, int]], page_size: int) -> AttentionBatch:
    """(q_len, cached) per request -> the step, with each request's pages drawn at random from
    the pool `twins` makes for it."""
    kv_lens = [q + c for q, c in shapes]
    pages = sum(-(-n // page_size) for n in kv_lens) + 4
    free = list(range(1, pages + 1))
    random.Random(len(shapes) * 31 + page_size).shuffle(free)
    tables = []
    for n in kv_lens:
        count = -(-n // page_size)
        tables.append(free[:count])
        free = free[count:]
    return AttentionBatch([q for q, _ in shapes], kv_lens, tables, page_size)


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = TOLERANCE[ref.dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def check_mha(
    shapes: list[tuple[int, int]],
    *,
    heads: int,
    kv_heads: int,
    dim: int,
    dtype: torch.dtype,
    page_size: int,
    device: str,
    blocks: TritonBlocks | None = SMALL,
) -> Twins:
    """One MHA/GQA step through both backends: same output, same pools."""
    batch = step_batch(shapes, page_size)
    pair = twins(KVLayout.mha(1, kv_heads, dim, dtype), batch, device, blocks, dim**-0.5)
    tokens = batch.num_tokens
    q = randn(tokens, heads, dim, dtype=dtype, device=device, seed=1)
    kv = randn(tokens, 2 * kv_heads, dim, dtype=dtype, device=device, seed=2)
    k, v = kv[:, :kv_heads], kv[:, kv_heads:]  # views of one tensor, as a fused projection's
    ref = pair.ref.forward(q, k, v, 0, pair.ref.prepare(batch))
    out = pair.triton.forward(q, k, v, 0, pair.triton.prepare(batch))
    assert_close(out, ref)
    pair.assert_pools_equal()
    return pair


def check_mla(
    shapes: list[tuple[int, int]],
    *,
    heads: int,
    rank: int,
    rope: int,
    dtype: torch.dtype,
    page_size: int,
    device: str,
    blocks: TritonBlocks | None = SMALL,
) -> Twins:
    """One MLA step (absorbed projections) through both backends: same output, same pools."""
    layout = KVLayout.mla(1, rank, rope, dtype)
    batch = step_batch(shapes, page_size)
    pair = twins(layout, batch, device, blocks, (rank + rope) ** -0.5)
    tokens = batch.num_tokens
    q = randn(tokens, heads, rank + rope, dtype=dtype, device=device, seed=3)
    kv = randn(tokens, rank + rope, dtype=dtype, device=device, seed=4)
    q_latent, q_rope = q[..., :rank], q[..., rank:]
    latent, k_rope = kv[:, :rank], kv[:, rank:]
    ref = pair.ref.forward_mla(q_latent, q_rope, latent, k_rope, 0, pair.ref.prepare(batch))
    meta = pair.triton.prepare(batch)
    out = pair.triton.forward_mla(q_latent, q_rope, latent, k_rope, 0, meta)
    assert_close(out, ref)
    pair.assert_pools_equal()
    return pair
