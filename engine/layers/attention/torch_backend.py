"""Paged attention in plain torch: runs on CPU and CUDA; the reference for faster backends.

Decoding requests (one new token each) are attended together: their pages are gathered whole
(one `index_select` per buffer, padded with the reserved page) into a [B, pages * page_size]
block, and an additive mask hides each row's tail. Attention runs in float32 whatever the
cache dtype: on CPU, bfloat16 SDPA and bmm are several times slower than converting the
gathered block, and float32 is the more exact of the two. Requests extending by several
tokens (prefill chunks) are attended one by one with a causal mask offset by their cached
length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from engine.kv.pool import RESERVED_PAGE
from engine.layers.attention.base import AttentionBackend, AttentionBatch
from engine.layers.attention.torch_mla import mla_attention


@dataclass
class ExtendItem:
    q_start: int
    q_len: int
    kv_len: int
    ctx_slots: torch.Tensor | None  # None: no cached prefix, attend to this step's k/v


@dataclass
class TorchAttentionMeta:
    write_slots: torch.Tensor  # [T]
    extends: list[ExtendItem]
    decode_rows: torch.Tensor | None  # [B] rows of q that decode
    decode_pages: torch.Tensor | None  # [B * max_pages] page ids, padded with RESERVED_PAGE
    decode_bias: torch.Tensor | None  # [B, 1, 1, max_pages * page_size] float32, 0 or -inf

    def gather_decode(self, buffer: torch.Tensor) -> torch.Tensor:
        """The decoding requests' whole pages of `buffer` ([pages, page_size, *token_shape])
        as float32 [B, max_pages * page_size, *token_shape]."""
        assert self.decode_pages is not None and self.decode_bias is not None
        block = torch.index_select(buffer, 0, self.decode_pages)
        return block.view(self.decode_bias.shape[0], -1, *buffer.shape[2:]).float()


def _slots(page_table: torch.Tensor, start: int, end: int, page_size: int) -> torch.Tensor:
    pos = torch.arange(start, end, device=page_table.device)
    return page_table[pos // page_size] * page_size + pos % page_size


class TorchAttention(AttentionBackend):
    def __init__(self, pool, scale: float) -> None:
        self.pool = pool
        self.scale = scale
        self.page_size = pool.page_size
        self.device = pool.device

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
            pages = self._tensor(table)
            if q_len > 1:
                if singles:
                    pieces.append(self._tensor(singles))
                    singles = []
                pieces.append(_slots(pages, kv_len - q_len, kv_len, ps))
            ctx = _slots(pages, 0, kv_len, ps) if kv_len > q_len else None
            extends.append(ExtendItem(row, q_len, kv_len, ctx))
            row += q_len
        if singles:
            pieces.append(self._tensor(singles))
        meta = TorchAttentionMeta(torch.cat(pieces), extends, None, None, None)
        if decode_rows:
            self._prepare_decode(meta, decode_rows, decode_tables, decode_lens)
        return meta

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prepare_decode(self, meta, rows, tables, lens) -> None:
        max_pages = max(len(t) for t in tables)
        flat = [p for t in tables for p in (*t, *[RESERVED_PAGE] * (max_pages - len(t)))]
        positions = torch.arange(max_pages * self.page_size, device=self.device)
        lens_t = torch.tensor(lens, device=self.device)
        visible = positions[None, :] < lens_t[:, None]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=self.device)
        meta.decode_bias = bias.masked_fill_(~visible, float("-inf"))[:, None, None, :]
        meta.decode_pages = torch.tensor(flat, dtype=torch.long, device=self.device)
        meta.decode_rows = torch.tensor(rows, dtype=torch.long, device=self.device)

    def forward(self, q, k, v, layer, meta: TorchAttentionMeta) -> torch.Tensor:
        k_cache = self.pool.k_buffer(layer).view(-1, k.shape[1], k.shape[2])
        v_cache = self.pool.v_buffer(layer).view(-1, v.shape[1], v.shape[2])
        k_cache.index_copy_(0, meta.write_slots, k)
        v_cache.index_copy_(0, meta.write_slots, v)
        out = torch.empty_like(q)
        for item in meta.extends:
            rows = slice(item.q_start, item.q_start + item.q_len)
            out[rows] = self._extend(q[rows], k[rows], v[rows], k_cache, v_cache, item)
        if meta.decode_rows is not None:
            self._decode(q, out, layer, meta)
        return out

    def forward_mla(self, q_latent, q_rope, latent, k_rope, layer, meta) -> torch.Tensor:
        buffer = self.pool.latent_buffer(layer)
        return mla_attention(buffer, q_latent, q_rope, latent, k_rope, meta, self.scale)

    def _extend(self, q, k, v, k_cache, v_cache, item: ExtendItem) -> torch.Tensor:
        if item.ctx_slots is not None:
            k, v = k_cache[item.ctx_slots], v_cache[item.ctx_slots]
        # float32 here too: CPU SDPA in bfloat16 is ~1.5x slower than converting first
        qh, kh, vh = (t.transpose(0, 1).float() for t in (q, k, v))
        if item.ctx_slots is None:
            o = F.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True
            )
        else:
            offset = item.kv_len - item.q_len
            mask = torch.ones(item.q_len, item.kv_len, dtype=torch.bool, device=q.device)
            o = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask.tril(offset), scale=self.scale, enable_gqa=True
            )
        return o.transpose(0, 1).to(q.dtype)

    def _decode(self, q, out, layer: int, meta: TorchAttentionMeta) -> None:
        rows = meta.decode_rows
        qd = q[rows].float()[:, :, None, :]  # [B, H, 1, D]
        kd = meta.gather_decode(self.pool.k_buffer(layer)).transpose(1, 2)  # [B, Hkv, L, D]
        vd = meta.gather_decode(self.pool.v_buffer(layer)).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_bias, scale=self.scale, enable_gqa=True
        )
        out[rows] = o[:, :, 0, :].to(out.dtype)
