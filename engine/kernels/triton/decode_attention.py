"""Paged decode attention: one query token per request, split over the KV for long contexts.

Stage 1 runs one program per (request, block of query heads sharing a KV head, KV split): the
heads of a GQA group (or all heads of MLA's one latent head) are the rows of one dot against
each block of keys, so a page is read once per group, not once per head. A request's context
is cut into `num_splits` equal runs of whole blocks; each program keeps a partial softmax of
its run (output and log-sum-exp), and stage 2 merges a request's runs. With one split stage 1
writes the output itself and stage 2 does not run.

```
 context of request b:  | split 0 | split 1 | ... | split S-1 |   (the tail ones may be empty)
 stage 1: program (b, heads, s) -> part_out[b, h, s, :], part_lse[b, h, s]
 stage 2: program (b, h)        -> out[row of b, h, :] = sum_s w_s part_out / sum_s w_s,
                                   w_s = exp2(part_lse[s] - max lse)
```

MHA reads values from the V buffer; MLA (`v=None`) takes them from the keys' first DV columns
(the latent), loaded once for both.
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

BLOCK_H = 16
"""Query heads per program: a GQA group (padded up to a dot's 16 rows), or a slice of MLA's."""


@triton.jit
def _decode_kernel(
    Q,
    QPe,
    K,
    V,
    Out,
    PartOut,
    PartLse,
    PageTables,
    Reqs,
    QStarts,
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
    num_splits,
    num_heads,
    GROUP: tl.constexpr,
    HEAD_BLOCKS: tl.constexpr,
    D: tl.constexpr,
    DPE: tl.constexpr,
    DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DPE: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    V_IS_K: tl.constexpr,
    DIRECT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_BLOCKS
    split = tl.program_id(2)
    req = tl.load(Reqs + b)
    kv_len = tl.load(KvLens + req)
    row = tl.load(QStarts + req).to(tl.int64)
    table = PageTables + req.to(tl.int64) * stride_table

    in_group = (tl.program_id(1) % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = in_group < GROUP
    heads = kv_head * GROUP + in_group
    d = tl.arange(0, BLOCK_D)
    mask_d = d < D
    q_mask = mask_h[:, None] & mask_d[None, :]
    q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0)
    if DPE > 0:
        dpe = tl.arange(0, BLOCK_DPE)
        mask_pe = dpe < DPE
        pe_mask = mask_h[:, None] & mask_pe[None, :]
        q_pe_ptrs = QPe + row * stride_pet + heads[:, None] * stride_peh + dpe[None, :]
        q_pe = tl.load(q_pe_ptrs, mask=pe_mask, other=0)
    dv = tl.arange(0, BLOCK_DV)
    mask_dv = dv < DV

    split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)
    head_base = kv_head.to(tl.int64) * stride_head
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < end
        tok = head_base + slot_offsets(table, pos, mask_n, PAGE_SIZE, stride_page, stride_tok)
        k = tl.load(K + tok[None, :] + d[:, None], mask=mask_d[:, None] & mask_n[None, :], other=0)
        scores = dot(q, k, PRECISION, UPCAST)
        if DPE > 0:
            k_pe_ptrs = K + tok[None, :] + pe_column + dpe[:, None]
            k_pe = tl.load(k_pe_ptrs, mask=mask_pe[:, None] & mask_n[None, :], other=0)
            scores += dot(q_pe, k_pe, PRECISION, UPCAST)
        scores = tl.where(mask_n[None, :], scores * qk_scale, float("-inf"))
        if V_IS_K:
            v = tl.trans(k)
        else:
            v_mask = mask_n[:, None] & mask_dv[None, :]
            v = tl.load(V + tok[:, None] + dv[None, :], mask=v_mask, other=0)
        m_i, l_i, acc = softmax_step(scores, v, m_i, l_i, acc, PRECISION, UPCAST)

    out_mask = mask_h[:, None] & mask_dv[None, :]
    if DIRECT:
        o = acc / l_i[:, None]
        out_ptrs = Out + row * stride_ot + heads[:, None] * stride_oh + dv[None, :]
        tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=out_mask)
    else:
        part = (b * num_heads + heads).to(tl.int64) * num_splits + split
        seen = l_i > 0  # an empty split (past a short context's end) saw no key
        l_safe = tl.where(seen, l_i, 1.0)
        tl.store(PartOut + part[:, None] * DV + dv[None, :], acc / l_safe[:, None], mask=out_mask)
        tl.store(PartLse + part, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")), mask=mask_h)


@triton.jit
def _merge_kernel(
    PartOut,
    PartLse,
    Out,
    Reqs,
    QStarts,
    stride_ot,
    stride_oh,
    num_splits,
    num_heads,
    DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(QStarts + tl.load(Reqs + b)).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    mask_s = s < num_splits
    part = (b * num_heads + head).to(tl.int64) * num_splits + s
    lse = tl.load(PartLse + part, mask=mask_s, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty: the max is finite
    dv = tl.arange(0, BLOCK_DV)
    mask_dv = dv < DV
    parts = tl.load(
        PartOut + part[:, None] * DV + dv[None, :], mask=mask_s[:, None] & mask_dv, other=0.0
    )
    o = tl.sum(weight[:, None] * parts, 0) / tl.sum(weight, 0)
    out_ptrs = Out + row * stride_ot + head * stride_oh + dv
    tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=mask_dv)


def decode_attention(
    q: torch.Tensor,
    q_pe: torch.Tensor | None,
    k: PagedKV,
    v: PagedKV | None,
    out: torch.Tensor,
    tables: StepTables,
    reqs: torch.Tensor,
    *,
    scale: float,
    num_splits: int,
    block_n: int,
) -> None:
    """Attend the one new token of each request in `reqs` ([B] indices into `tables`).

    q [T, H, D] (+ q_pe [T, H, DPE] against key columns [D, D + DPE), MLA's rope part), keys
    in `k`; values in `v`, or with v=None the keys' first DV columns. Writes out [T, H, DV] at
    the requests' rows (row q_starts[r]). Contexts are split `num_splits` ways.
    """
    q = rows(q)
    q_pe = q if q_pe is None else rows(q_pe)
    batch, heads, dim = len(reqs), q.shape[1], q.shape[2]
    dim_pe = 0 if q_pe is q else q_pe.shape[2]
    dim_v = out.shape[2]
    group = heads // k.heads
    head_blocks = triton.cdiv(group, BLOCK_H)
    direct = num_splits == 1
    part_out = part_lse = out  # unused when direct
    if not direct:
        part_out = q.new_empty(batch, heads, num_splits, dim_v, dtype=torch.float32)
        part_lse = q.new_empty(batch, heads, num_splits, dtype=torch.float32)
    grid = (batch, k.heads * head_blocks, num_splits)
    _decode_kernel[grid](
        q,
        q_pe,
        k.buffer,
        k.buffer if v is None else v.buffer,
        out,
        part_out,
        part_lse,
        tables.page_tables,
        reqs,
        tables.q_starts,
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
        num_splits,
        heads,
        GROUP=group,
        HEAD_BLOCKS=head_blocks,
        D=dim,
        DPE=dim_pe,
        DV=dim_v,
        PAGE_SIZE=k.page_size,
        BLOCK_H=BLOCK_H,
        BLOCK_N=block_n,
        BLOCK_D=dot_block(dim),
        BLOCK_DPE=dot_block(dim_pe),
        BLOCK_DV=dot_block(dim_v),
        V_IS_K=v is None,
        DIRECT=direct,
        PRECISION=dot_precision(q.dtype),
        UPCAST=upcast_dots(q.dtype),
        num_warps=4,
    )
    if not direct:
        _merge_kernel[(batch, heads)](
            part_out,
            part_lse,
            out,
            reqs,
            tables.q_starts,
            out.stride(0),
            out.stride(1),
            num_splits,
            heads,
            DV=dim_v,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_DV=triton.next_power_of_2(dim_v),
            num_warps=4,
        )
