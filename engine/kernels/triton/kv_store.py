"""A step's K/V into the page pool: token i's heads go to its slot (engine/kv/pool.py).

One kernel for both layouts, storing two sources per token in one launch:
MHA: k -> K buffer and v -> V buffer (every KV head of the token's slot);
MLA: latent -> columns [0, R) and k_rope -> columns [R, R + P) of the one latent buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.common import PagedKV, rows


@triton.jit
def _store_kernel(
    SrcA,
    SrcB,
    DstA,
    DstB,
    Slots,
    stride_at,
    stride_ah,
    stride_bt,
    stride_bh,
    stride_page,
    stride_head,
    stride_tok,
    b_column,
    HEADS: tl.constexpr,
    DA: tl.constexpr,
    DB: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + token).to(tl.int64)
    base = (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_tok
    heads = tl.arange(0, BLOCK_H)
    dst_heads = base + heads[:, None] * stride_head

    da = tl.arange(0, BLOCK_DA)
    mask_a = (heads[:, None] < HEADS) & (da[None, :] < DA)
    a = tl.load(SrcA + token * stride_at + heads[:, None] * stride_ah + da[None, :], mask=mask_a)
    tl.store(DstA + dst_heads + da[None, :], a.to(DstA.dtype.element_ty), mask=mask_a)

    db = tl.arange(0, BLOCK_DB)
    mask_b = (heads[:, None] < HEADS) & (db[None, :] < DB)
    b = tl.load(SrcB + token * stride_bt + heads[:, None] * stride_bh + db[None, :], mask=mask_b)
    tl.store(DstB + dst_heads + b_column + db[None, :], b.to(DstB.dtype.element_ty), mask=mask_b)


def store_kv(
    a: torch.Tensor,
    b: torch.Tensor,
    dst_a: PagedKV,
    dst_b: PagedKV,
    slots: torch.Tensor,
    b_column: int = 0,
) -> None:
    """Store a [T, heads, DA] and b [T, heads, DB] at token slots `slots` [T] of `dst_a` and
    `dst_b` (alike in layout), b from column `b_column` of its rows on."""
    a, b = rows(a), rows(b)
    tokens, heads, dim_a = a.shape
    dim_b = b.shape[2]
    if tokens == 0:
        return
    _store_kernel[(tokens,)](
        a,
        b,
        dst_a.buffer,
        dst_b.buffer,
        slots,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        dst_a.stride_page,
        dst_a.stride_head,
        dst_a.stride_tok,
        b_column,
        HEADS=heads,
        DA=dim_a,
        DB=dim_b,
        PAGE_SIZE=dst_a.page_size,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_DA=triton.next_power_of_2(dim_a),
        BLOCK_DB=triton.next_power_of_2(max(dim_b, 1)),
        num_warps=1 if heads * (dim_a + dim_b) <= 512 else 4,
    )
