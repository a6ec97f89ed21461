"""The attention backend interface.

A backend is built once per engine with the KV page pool. Every step the runner describes the
batch once (`AttentionBatch`); the backend turns it into its own metadata (`prepare`), and each
layer then calls `forward`, which stores the step's K/V into the pages and attends over the
request's whole context.

Token layout of a step (requests back to back, new tokens only):

    q rows:  | req0: q_len0 | req1: q_len1 | ... |
    req i's new tokens sit at positions [kv_len_i - q_len_i, kv_len_i) of its sequence;
    its page table maps sequence position p to slot page_table[p // page_size] * page_size
    + p % page_size in every layer's buffer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class AttentionBatch:
    q_lens: Sequence[int]
    kv_lens: Sequence[int]
    page_tables: Sequence[Sequence[int]]
    page_size: int

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)


class AttentionBackend(ABC):
    """Paged attention over the engine's KV pool."""

    @abstractmethod
    def prepare(self, batch: AttentionBatch) -> Any:
        """Build the per-step metadata shared by all layers."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, meta: Any
    ) -> torch.Tensor:
        """q: [T, q_heads, D]; k, v: [T, kv_heads, D] (this step's). Returns [T, q_heads, D]."""

    def forward_mla(
        self,
        q_latent: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        layer: int,
        meta: Any,
    ) -> torch.Tensor:
        """Multi-head latent attention (DeepSeek) over an MLA pool, projections absorbed.

        q_latent: [T, H, R] (q_nope folded through W_UK), q_rope: [T, H, P] (rotated);
        latent: [T, R] (normed compressed KV), k_rope: [T, P] (rotated), this step's tokens.
        Writes [latent | k_rope] into the layer's latent buffer, then attends as one shared KV
        head: score = q_latent . latent + q_rope . k_rope (times the backend's scale),
        value = latent. Returns [T, H, R]; the model applies W_UV and o_proj.
        """
        raise NotImplementedError(
            f"attention backend {type(self).__name__} has no MLA path "
            "(serve DeepSeek models with attention_backend='torch')"
        )


@dataclass
class ForwardContext:
    """What the model's attention layers need for this step."""

    backend: AttentionBackend
    meta: Any

    def attention(self, q, k, v, layer: int) -> torch.Tensor:
        return self.backend.forward(q, k, v, layer, self.meta)

    def attention_mla(self, q_latent, q_rope, latent, k_rope, layer: int) -> torch.Tensor:
        return self.backend.forward_mla(q_latent, q_rope, latent, k_rope, layer, self.meta)
