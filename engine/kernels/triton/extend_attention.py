"""Paged extend (prefill) attention: each request's new tokens against its whole context, causal.

One program per (block of BLOCK_M new tokens of one request, query head). Blocks are listed on
the host (`block_reqs`, `block_starts`), so a ragged batch launches no idle program. A block's
queries sit at sequence positions prefix + [m0, m0 + BLOCK_M) (prefix = kv_len - q_len, the
cached part); it reads keys [0, prefix + m0 + BLOCK_M) from the pages (this step's included: the
store runs first) in blocks of BLOCK_N with an online softmax, hiding key j from query i where
j > i:

```
 keys:     0 ........ prefix ........ prefix + m0 ........ prefix + m0 + BLOCK_M
 query i:  | cached (all seen) | new, seen up to i ... |
```

MLA extends the same way with one latent KV head; its values are the keys' first DV columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton.common import (
    LOG2E,
    PagedKV,
    StepTables,
    dot,
    dot_block,
    dot_precision,
    rows,
    slot_offsets,
    softmax_step,
    upcast_dots,
)


@triton.jit
def _extend_kernel(
    Q,
    QPe,
    K,
    V,
    Out,
    PageTables,
    BlockReqs,
    BlockStarts,
    QStarts,
    QLens,
    KvLens,
    stride_qt,
    stride_qh,
    stride_pet,
    stride_peh,
    stride_ot,
    stride_oh,
    stride_table,
    stride_page,
    stride_head,
    stride_tok,
    pe_column,
    qk_scale,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DPE: tl.constexpr,
    DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DPE: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    V_IS_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    req = tl.load(BlockReqs + block)
    m0 = tl.load(BlockStarts + block)
    q_len = tl.load(QLens + req)
    kv_len = tl.load(KvLens + req)
    prefix = kv_len - q_len
    table = PageTables + req.to(tl.int64) * stride_table

    m = m0 + tl.arange(0, BLOCK_M)
    mask_m = m < q_len
    q_rows = (tl.load(QStarts + req) + m).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < D
    q_ptrs = Q + q_rows[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0)
    if DPE > 0:
        dpe = tl.arange(0, BLOCK_DPE)
        mask_pe = dpe < DPE
        q_pe_ptrs = QPe + q_rows[:, None] * stride_pet + head * stride_peh + dpe[None, :]
        q_pe = tl.load(q_pe_ptrs, mask=mask_m[:, None] & mask_pe[None, :], other=0)
    dv = tl.arange(0, BLOCK_DV)
    mask_dv = dv < DV

    q_pos = prefix + m
    end = tl.minimum(kv_len, prefix + m0 + BLOCK_M)
    head_base = (head // GROUP).to(tl.int64) * stride_head
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < end
        tok = head_base + slot_offsets(table, pos, mask_n, PAGE_SIZE, stride_page, stride_tok)
        k = tl.load(K + tok[None, :] + d[:, None], mask=mask_d[:, None] & mask_n[None, :], other=0)
        scores = dot(q, k, PRECISION, UPCAST)
        if DPE > 0:
            k_pe_ptrs = K + tok[None, :] + pe_column + dpe[:, None]
            k_pe = tl.load(k_pe_ptrs, mask=mask_pe[:, None] & mask_n[None, :], other=0)
            scores += dot(q_pe, k_pe, PRECISION, UPCAST)
        visible = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
        scores = tl.where(visible, scores * qk_scale, float("-inf"))
        if V_IS_K:
            v = tl.trans(k)
        else:
            v_mask = mask_n[:, None] & mask_dv[None, :]
            v = tl.load(V + tok[:, None] + dv[None, :], mask=v_mask, other=0)
        m_i, l_i, acc = softmax_step(scores, v, m_i, l_i, acc, PRECISION, UPCAST)

    o = acc / l_i[:, None]
    out_ptrs = Out + q_rows[:, None] * stride_ot + head * stride_oh + dv[None, :]
    tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


def extend_attention(
    q: torch.Tensor,
    q_pe: torch.Tensor | None,
    k: PagedKV,
    v: PagedKV | None,
    out: torch.Tensor,
    tables: StepTables,
    block_reqs: torch.Tensor,
    block_starts: torch.Tensor,
    *,
    scale: float,
    block_m: int,
    block_n: int,
) -> None:
    """Attend the new tokens of the blocks listed (block i: tokens [block_starts[i],
    block_starts[i] + block_m) of request block_reqs[i]) causally over their contexts.

    Shapes as `decode_attention`'s: q [T, H, D] (+ q_pe), keys in `k`, values in `v` or (v=None)
    the keys' first DV columns; writes out [T, H, DV] at the blocks' rows.
    """
    q = rows(q)
    q_pe = q if q_pe is None else rows(q_pe)
    heads, dim = q.shape[1], q.shape[2]
    dim_pe = 0 if q_pe is q else q_pe.shape[2]
    dim_v = out.shape[2]
    _extend_kernel[(len(block_reqs), heads)](
        q,
        q_pe,
        k.buffer,
        k.buffer if v is None else v.buffer,
        out,
        tables.page_tables,
        block_reqs,
        block_starts,
        tables.q_starts,
        tables.q_lens,
        tables.kv_lens,
        q.stride(0),
        q.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        out.stride(0),
        out.stride(1),
        tables.page_tables.stride(0),
        k.stride_page,
        k.stride_head,
        k.stride_tok,
        dim,
        scale * LOG2E,
        GROUP=heads // k.heads,
        D=dim,
        DPE=dim_pe,
        DV=dim_v,
        PAGE_SIZE=k.page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=dot_block(dim),
        BLOCK_DPE=dot_block(dim_pe),
        BLOCK_DV=dot_block(dim_v),
        V_IS_K=v is None,
        PRECISION=dot_precision(q.dtype),
        UPCAST=upcast_dots(q.dtype),
        num_warps=4 if dim <= 128 else 8,
    )
