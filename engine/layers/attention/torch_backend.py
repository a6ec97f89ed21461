"""Paged attention in plain torch: runs on CPU and CUDA; the reference for faster backends.

Decoding requests (one new token each) are attended together: their contexts are gathered into
one padded [B, max_len] block with a mask. Requests extending by several tokens (prefill
chunks) are attended one by one with a causal mask offset by their cached length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

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
    decode_slots: torch.Tensor | None  # [B, max_len]
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_len] bool


def _slots(page_table: torch.Tensor, start: int, end: int, page_size: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    return page_table[pos // page_size] * page_size + pos % page_size


class TorchAttention(AttentionBackend):
    def __init__(self, pool, scale: float) -> None:
        self.pool = pool
        self.scale = scale
        self.page_size = pool.page_size

    def prepare(self, batch: AttentionBatch) -> TorchAttentionMeta:
        ps = self.page_size
        write, extends, decode_rows, decode_tables, decode_lens = [], [], [], [], []
        row = 0
        for q_len, kv_len, table in zip(batch.q_lens, batch.kv_lens, batch.page_tables):
            pages = torch.tensor(table, dtype=torch.long)
            write.append(_slots(pages, kv_len - q_len, kv_len, ps))
            if q_len == 1 and kv_len > 1:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_lens.append(kv_len)
            else:
                ctx = _slots(pages, 0, kv_len, ps) if kv_len > q_len else None
                extends.append(ExtendItem(row, q_len, kv_len, ctx))
            row += q_len
        meta = TorchAttentionMeta(torch.cat(write), extends, None, None, None)
        if decode_rows:
            self._prepare_decode(meta, decode_rows, decode_tables, decode_lens)
        return meta

    def _prepare_decode(self, meta, rows, tables, lens) -> None:
        ps = self.page_size
        max_pages = max(len(t) for t in tables)
        padded = torch.zeros(len(tables), max_pages, dtype=torch.long)
        for i, t in enumerate(tables):
            padded[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        slots = (padded[:, :, None] * ps + torch.arange(ps)).view(len(tables), -1)
        max_len = max(lens)
        lens_t = torch.tensor(lens)
        meta.decode_slots = slots[:, :max_len]
        meta.decode_mask = (torch.arange(max_len)[None, :] < lens_t[:, None])[:, None, None, :]
        meta.decode_rows = torch.tensor(rows, dtype=torch.long)

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
            self._decode(q, out, k_cache, v_cache, meta)
        return out

    def forward_mla(self, q_latent, q_rope, latent, k_rope, layer, meta) -> torch.Tensor:
        buffer = self.pool.latent_buffer(layer)
        return mla_attention(buffer, q_latent, q_rope, latent, k_rope, meta, self.scale)

    def _extend(self, q, k, v, k_cache, v_cache, item: ExtendItem) -> torch.Tensor:
        if item.ctx_slots is not None:
            k, v = k_cache[item.ctx_slots], v_cache[item.ctx_slots]
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if item.ctx_slots is None:
            o = F.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True
            )
        else:
            offset = item.kv_len - item.q_len
            mask = torch.ones(item.q_len, item.kv_len, dtype=torch.bool).tril(offset)
            o = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, scale=self.scale, enable_gqa=True
            )
        return o.transpose(0, 1)

    def _decode(self, q, out, k_cache, v_cache, meta: TorchAttentionMeta) -> None:
        rows = meta.decode_rows
        qd = q[rows][:, :, None, :]  # [B, H, 1, D]
        kd = k_cache[meta.decode_slots].transpose(1, 2)  # [B, Hkv, L, D]
        vd = v_cache[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=True
        )
        out[rows] = o[:, :, 0, :]
