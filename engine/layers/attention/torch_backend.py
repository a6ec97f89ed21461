"""Paged attention in plain torch: runs on CPU and CUDA; the reference for faster backends.

MHA pages are head-major ([kv_heads, page_size, head_dim], see engine/kv/pool.py), so K/V move
as rows of `buffer.view(-1, head_dim)`: this step's tokens are stored with one `index_copy_` of
[tokens * kv_heads] rows, and context is gathered with one `index_select` straight into the
[n, kv_heads, len, head_dim] order SDPA takes (row indices built once per step, shared by every
layer). Decoding requests (one new token each) are attended together: their pages are gathered
whole (padded with the reserved page) into a [B, kv_heads, pages * page_size] block, and an
additive mask hides each row's tail. Attention runs in float32 whatever the cache dtype: on CPU,
bfloat16 SDPA and bmm are several times slower than converting the gathered block, and float32
is the more exact of the two. Requests extending by several tokens (prefill chunks) are attended
together too: grouped so that padding wastes little, each group's queries are padded to its
longest and its keys gathered from the cache (this step's included) in one `index_select`, under
a causal mask offset by each request's cached length. CPU SDPA's per-call overhead is large at
small head sizes: one call for 16 prompts of 256 tokens is ~4x faster than 16 calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from engine.kernels.decode_attention import DecodeAttention
from engine.kv.pool import RESERVED_PAGE, head_rows
from engine.layers.attention.base import AttentionBackend, AttentionBatch
from engine.layers.attention.torch_mla import mla_attention


@dataclass
class ExtendItem:
    q_start: int
    q_len: int
    kv_len: int
    slots: torch.Tensor  # cache slots of positions [0, kv_len), this step's included

    @property
    def ctx_slots(self) -> torch.Tensor | None:
        """`slots` when there is a cached prefix; None: attend to this step's k/v alone."""
        return self.slots if self.kv_len > self.q_len else None


@dataclass
class ExtendGroup:
    """Extends attended in one SDPA call, padded to [n, q_len] queries and [n, kv_len] keys."""

    q_src: torch.Tensor  # [n * q_len] rows of q (padding repeats a request's last row)
    kv_rows: torch.Tensor  # [n * kv_heads * kv_len] rows of the cache (padding: reserved page)
    mask: torch.Tensor | None  # [n, 1, q_len, kv_len] bool; None: all fresh, same length
    out_src: torch.Tensor  # positions of real queries in the padded [n * q_len]
    out_rows: torch.Tensor  # ... and their rows in q
    n: int
    q_len: int
    kv_len: int
    # fresh prefills of one length whose rows of q follow each other: [start, start + n * q_len)
    # of q, and of this step's k and v, which are all they attend to (no gather, no padding)
    first_row: int | None = None


def group_extends(
    items: list[ExtendItem], page_size: int, kv_heads: int, waste: float = 2.0
) -> list[ExtendGroup]:
    """Groups of extends (in kv_len order) whose padded attention costs at most `waste` times
    their own."""
    groups, current = [], []
    for item in sorted(items, key=lambda i: i.kv_len):
        trial = [*current, item]
        padded = len(trial) * max(i.q_len for i in trial) * item.kv_len
        if current and padded > waste * sum(i.q_len * i.kv_len for i in trial):
            groups.append(_group(current, page_size, kv_heads))
            trial = [item]
        current = trial
    if current:
        groups.append(_group(current, page_size, kv_heads))
    return groups


def _group(items: list[ExtendItem], page_size: int, kv_heads: int) -> ExtendGroup:
    n, device = len(items), items[0].slots.device
    q_len, kv_len = max(i.q_len for i in items), max(i.kv_len for i in items)
    q_lens = torch.tensor([i.q_len for i in items], device=device)
    kv_lens = torch.tensor([i.kv_len for i in items], device=device)
    starts = torch.tensor([i.q_start for i in items], device=device)
    cols = torch.arange(q_len, device=device)
    q_src = starts[:, None] + torch.minimum(cols[None, :], q_lens[:, None] - 1)
    real = cols[None, :] < q_lens[:, None]
    pad = RESERVED_PAGE * page_size
    kv_slots = torch.stack([F.pad(i.slots, (0, kv_len - i.kv_len), value=pad) for i in items])
    kv_rows = head_rows(kv_slots, kv_heads, page_size).flatten()
    mask = None
    if any(i.q_len != q_len or i.kv_len != q_len for i in items):
        keys = torch.arange(kv_len, device=device)
        offset = (kv_lens - q_lens)[:, None, None]
        mask = keys[None, None, :] <= cols[None, :, None] + offset
        mask = (mask & (keys[None, None, :] < kv_lens[:, None, None]))[:, None]
    out_src = real.flatten().nonzero()[:, 0]
    first = items[0].q_start
    following = all(i.q_start == first + k * q_len for k, i in enumerate(items))
    return ExtendGroup(
        q_src.flatten(), kv_rows, mask, out_src, q_src.flatten()[out_src], n, q_len, kv_len,
        first if mask is None and following else None,
    )  # fmt: skip


@dataclass
class TorchAttentionMeta:
    write_slots: torch.Tensor  # [T]
    extends: list[ExtendItem]
    decode_rows: torch.Tensor | None  # [B] rows of q that decode
    decode_pages: torch.Tensor | None  # [B, max_pages] page ids, padded with RESERVED_PAGE
    decode_lens: torch.Tensor | None  # [B] context lengths, this step's token included
    page_size: int = 0
    extend_groups: list[ExtendGroup] | None = None  # built on first use (MHA only)
    _decode_bias: torch.Tensor | None = None
    _write_rows: torch.Tensor | None = None
    _decode_head_rows: torch.Tensor | None = None

    def write_rows(self, kv_heads: int) -> torch.Tensor:
        """MHA: [T * kv_heads] rows of `buffer.view(-1, head_dim)` for this step's k/v heads,
        in the order of `k.reshape(-1, head_dim)` (token, then head)."""
        if self._write_rows is None:
            rows = head_rows(self.write_slots, kv_heads, self.page_size)
            self._write_rows = rows.t().flatten()
        return self._write_rows

    @property
    def decode_bias(self) -> torch.Tensor:
        """[B, 1, 1, max_pages * page_size] float32: 0 where a row's context is, else -inf."""
        assert self.decode_pages is not None and self.decode_lens is not None
        if self._decode_bias is None:
            span = self.decode_pages.shape[1] * self.page_size
            positions = torch.arange(span, device=self.decode_lens.device)
            visible = positions[None, :] < self.decode_lens[:, None]
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
            self._decode_bias = bias.masked_fill_(~visible, float("-inf"))[:, None, None, :]
        return self._decode_bias

    def gather_decode(self, buffer: torch.Tensor) -> torch.Tensor:
        """MLA: the decoding requests' whole pages of `buffer` ([pages, page_size, width]) as
        float32 [B, max_pages * page_size, width]."""
        assert self.decode_pages is not None
        block = torch.index_select(buffer, 0, self.decode_pages.flatten())
        return block.view(self.decode_pages.shape[0], -1, *buffer.shape[2:]).float()

    def gather_decode_heads(self, buffer: torch.Tensor) -> torch.Tensor:
        """MHA: the decoding requests' whole pages of `buffer` ([pages, kv_heads, page_size,
        head_dim]) as float32 [B, kv_heads, max_pages * page_size, head_dim]."""
        assert self.decode_pages is not None
        batch, max_pages = self.decode_pages.shape
        kv_heads, dim = buffer.shape[1], buffer.shape[3]
        if self._decode_head_rows is None:
            offsets = torch.arange(self.page_size, device=self.decode_pages.device)
            slots = (self.decode_pages[:, :, None] * self.page_size + offsets).view(batch, -1)
            self._decode_head_rows = head_rows(slots, kv_heads, self.page_size).flatten()
        block = torch.index_select(buffer.view(-1, dim), 0, self._decode_head_rows)
        return block.view(batch, kv_heads, max_pages * self.page_size, dim).float()


def _slots(page_table: torch.Tensor, start: int, end: int, page_size: int) -> torch.Tensor:
    pos = torch.arange(start, end, device=page_table.device)
    return page_table[pos // page_size] * page_size + pos % page_size


class TorchAttention(AttentionBackend):
    def __init__(self, pool, scale: float) -> None:
        self.pool = pool
        self.scale = scale
        self.page_size = pool.page_size
        self.device = pool.device
        # the native CPU kernel for decode rows (kernels/decode_attention.py), set by the runner
        self.decode_kernel: DecodeAttention | None = None

    def prepare(self, batch: AttentionBatch) -> TorchAttentionMeta:
        ps = self.page_size
        extends, decode_rows, decode_tables, decode_lens = [], [], [], []
        # write slots in row order: a decode row's one slot as a plain int (no tensor per
        # request each step), an extend's run as a tensor
        pieces: list[torch.Tensor] = []
        singles: list[int] = []
        row = 0
        for q_len, kv_len, table in zip(batch.q_lens, batch.kv_lens, batch.page_tables):
            if q_len == 1:
                last = kv_len - 1
                singles.append(table[last // ps] * ps + last % ps)
                if kv_len > 1:
                    decode_rows.append(row)
                    decode_tables.append(table)
                    decode_lens.append(kv_len)
                    row += 1
                    continue
            slots = _slots(self._tensor(table), 0, kv_len, ps)
            if q_len > 1:
                if singles:
                    pieces.append(self._tensor(singles))
                    singles = []
                pieces.append(slots[kv_len - q_len :])
            extends.append(ExtendItem(row, q_len, kv_len, slots))
            row += q_len
        if singles:
            pieces.append(self._tensor(singles))
        meta = TorchAttentionMeta(torch.cat(pieces), extends, None, None, None, ps)
        if decode_rows:
            self._prepare_decode(meta, decode_rows, decode_tables, decode_lens)
        return meta

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prepare_decode(self, meta, rows, tables, lens) -> None:
        max_pages = max(len(t) for t in tables)
        flat = [p for t in tables for p in (*t, *[RESERVED_PAGE] * (max_pages - len(t)))]
        pages = torch.tensor(flat, dtype=torch.long, device=self.device)
        meta.decode_pages = pages.view(len(tables), max_pages)
        meta.decode_lens = torch.tensor(lens, dtype=torch.long, device=self.device)
        meta.decode_rows = torch.tensor(rows, dtype=torch.long, device=self.device)

    def forward(self, q, k, v, layer, meta: TorchAttentionMeta) -> torch.Tensor:
        kv_heads, dim = k.shape[1:]
        k_cache = self.pool.k_buffer(layer).view(-1, dim)  # rows: (page, head, offset)
        v_cache = self.pool.v_buffer(layer).view(-1, dim)
        rows = meta.write_rows(kv_heads)
        k_cache.index_copy_(0, rows, k.reshape(-1, dim))
        v_cache.index_copy_(0, rows, v.reshape(-1, dim))
        out = torch.empty_like(q)
        if meta.extends and meta.extend_groups is None:
            meta.extend_groups = group_extends(meta.extends, self.page_size, kv_heads)
        for group in meta.extend_groups or ():
            if group.first_row is not None and k.dtype == k_cache.dtype:
                self._fresh(q, k, v, out, group)
            else:
                self._extend(q, k_cache, v_cache, out, group)
        if meta.decode_rows is not None:
            self._decode(q, out, layer, meta)
        return out

    def forward_mla(self, q_latent, q_rope, latent, k_rope, layer, meta) -> torch.Tensor:
        buffer = self.pool.latent_buffer(layer)
        return mla_attention(buffer, q_latent, q_rope, latent, k_rope, meta, self.scale)

    def _extend(self, q, k_cache, v_cache, out, g: ExtendGroup) -> None:
        # float32 here too: CPU SDPA in bfloat16 is ~1.5x slower than converting first
        heads, dim = q.shape[1:]
        qh = q.index_select(0, g.q_src).view(g.n, g.q_len, heads, dim).transpose(1, 2).float()
        kh = k_cache.index_select(0, g.kv_rows).view(g.n, -1, g.kv_len, dim).float()
        vh = v_cache.index_select(0, g.kv_rows).view(g.n, -1, g.kv_len, dim).float()
        o = F.scaled_dot_product_attention(
            qh,
            kh,
            vh,
            attn_mask=g.mask,
            is_causal=g.mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        o = o.transpose(1, 2).reshape(g.n * g.q_len, heads, dim)
        out.index_copy_(0, g.out_rows, o.index_select(0, g.out_src).to(out.dtype))

    def _fresh(self, q, k, v, out, g: ExtendGroup) -> None:
        """`_extend` of fresh prefills that follow each other in q: slices of this step's q, k
        and v in place of gathers (the same numbers: k and v are what the cache holds)."""
        heads, dim = q.shape[1:]
        rows = slice(g.first_row, g.first_row + g.n * g.q_len)

        def by_request(x: torch.Tensor) -> torch.Tensor:
            # NOTE: dense [n, q_len, heads, dim], then seen heads first: SDPA ran fastest so
            # (converted after the transpose, a strided view of qkv came out heads-major)
            return x[rows].view(g.n, g.q_len, -1, dim).float().transpose(1, 2)

        o = F.scaled_dot_product_attention(
            by_request(q), by_request(k), by_request(v), is_causal=True, scale=self.scale,
            enable_gqa=True,
        )  # fmt: skip
        out[rows].view(g.n, g.q_len, heads, dim).copy_(o.transpose(1, 2))

    def _decode(self, q, out, layer: int, meta: TorchAttentionMeta) -> None:
        rows = meta.decode_rows
        k_buffer, v_buffer = self.pool.k_buffer(layer), self.pool.v_buffer(layer)
        kernel = self.decode_kernel
        kv_heads, dim = k_buffer.shape[1], k_buffer.shape[3]
        if kernel is not None and kernel.supports(k_buffer.dtype, q.shape[1], kv_heads, dim):
            o = kernel(q[rows], k_buffer, v_buffer, meta.decode_pages, meta.decode_lens, self.scale)
            out[rows] = o.to(out.dtype)
            return
        qd = q[rows].float()[:, :, None, :]  # [B, H, 1, D]
        kd = meta.gather_decode_heads(k_buffer)  # [B, Hkv, L, D]
        vd = meta.gather_decode_heads(v_buffer)
        o = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_bias, scale=self.scale, enable_gqa=True
        )
        out[rows] = o[:, :, 0, :].to(out.dtype)
