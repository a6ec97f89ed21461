"""MLA (absorbed, one shared latent KV head) in plain torch over the MLA page pool.

Uses the torch backend's per-step metadata as it is: the same write slots, extend items and
gathered decode pages as MHA; only the buffer (one latent row per token) and the math differ.
Because every head reads the same keys, heads are folded into query rows: a step is one
[rows, D] x [D, L] attention per request (extend) or per batch (decode), never H of them.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def mla_attention(
    buffer: torch.Tensor,
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    meta,
    scale: float,
) -> torch.Tensor:
    """Store this step's [latent | k_rope] in `buffer` (the layer's latent pages) and attend.

    See `AttentionBackend.forward_mla` for shapes; `meta` is a `TorchAttentionMeta`.
    """
    rank = latent.shape[-1]
    cache = buffer.view(-1, buffer.shape[-1])
    step_kv = torch.cat((latent, k_rope), dim=-1).to(cache.dtype)
    cache.index_copy_(0, meta.write_slots, step_kv)
    q = torch.cat((q_latent, q_rope), dim=-1)
    out = q.new_empty(*q.shape[:2], rank)
    for item in meta.extends:
        rows = slice(item.q_start, item.q_start + item.q_len)
        keys = step_kv[rows] if item.ctx_slots is None else cache[item.ctx_slots]
        out[rows] = _extend(q[rows], keys, rank, scale)
    if meta.decode_rows is not None:
        out[meta.decode_rows] = _decode(q[meta.decode_rows], buffer, meta, rank, scale)
    return out


def _extend(q: torch.Tensor, keys: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """q [n, H, D] of the last n of L positions against keys [L, D]: causal, heads folded."""
    n, heads, dim = q.shape
    kv_len = keys.shape[0]
    visible = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - n, kv_len)[:, None]
    mask = visible.to(q.device).repeat_interleave(heads, dim=0)  # row t * H + h
    o = F.scaled_dot_product_attention(
        q.reshape(1, n * heads, dim), keys[None], keys[None, :, :rank], attn_mask=mask, scale=scale
    )
    return o.view(n, heads, rank)


def _decode(q: torch.Tensor, buffer: torch.Tensor, meta, rank: int, scale: float) -> torch.Tensor:
    """q [B, H, D], one new token per request, against each request's padded context."""
    keys = meta.gather_decode(buffer)[:, None]  # [B, 1, L, D]
    o = F.scaled_dot_product_attention(
        q[:, None].float(), keys, keys[..., :rank], attn_mask=meta.decode_bias, scale=scale
    )
    return o[:, 0].to(q.dtype)
