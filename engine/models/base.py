"""What every decoder-only model here shares: embed -> layers -> norm, and the LM head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.layers.vocab import Matmul, VocabEmbedding, full_logits, greedy_ids
from engine.parallel.group import Parallel


class DecoderOnlyLM(nn.Module):
    """Subclasses build `embed_tokens`, `layers` (each `layer(x, cos_sin, ctx)`), `norm`,
    `rotary` and `lm_head` (None when tied to the embeddings), and keep their rank's `tp`."""

    tp: Parallel
    embed_tokens: VocabEmbedding
    layers: nn.ModuleList
    norm: nn.Module
    rotary: Any
    lm_head: Any

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm for the step's tokens."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos_sin, ctx)
        return self.norm(x)

    @property
    def head(self) -> VocabEmbedding:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.head.weight

    def compute_logits(self, hidden: torch.Tensor, matmul: Matmul | None = None) -> torch.Tensor:
        """float32 logits [T, vocab] of final hidden states [T, hidden] (on every rank);
        `matmul` computes this rank's slice instead of torch (a native kernel)."""
        return full_logits(hidden, self.head, matmul)

    def greedy(
        self, hidden: torch.Tensor, matmul: Matmul | None = None, argmax: Matmul | None = None
    ) -> torch.Tensor:
        """The argmax token id of each row, without gathering the whole logits."""
        return greedy_ids(hidden, self.head, matmul, argmax)
