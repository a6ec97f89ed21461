"""The vocabulary split over the ranks: the embedding and the LM head.

Rank r holds rows [r * V/tp, (r + 1) * V/tp) (V padded up to a multiple of tp; pad rows are
zero and their logits -inf). The embedding looks up the ids it holds and sums over the ranks;
the LM head gives each rank its slice of the logits, gathered whole only where sampling needs
them: greedy needs just every rank's best (value, id) pair.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from engine.layers.linear import copy_slice, linear
from engine.parallel.group import Parallel
from engine.weights import WeightRef


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: Parallel) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.rows = -(-vocab_size // tp.size)
        self.start = tp.rank * self.rows
        self.real_rows = max(0, min(vocab_size - self.start, self.rows))
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.real_rows)
        out = F.embedding(local.masked_fill(~mine, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(~mine[:, None], 0.0))

    def load_param(self, kind: str, loaded: WeightRef, name: str) -> None:
        rows = self.weight[: self.real_rows]
        copy_slice(rows, loaded, name, 0, self.start, self.vocab_size)


class LMHead(VocabEmbedding):
    """The output projection, vocabulary-parallel (an untied head; a tied one is the
    embedding's weight, used the same way)."""


Matmul = Callable[[torch.Tensor], torch.Tensor]  # hidden -> float32 logits of this rank's slice


def local_logits(
    hidden: torch.Tensor, head: VocabEmbedding, matmul: Matmul | None = None
) -> torch.Tensor:
    """float32 logits of this rank's vocabulary slice [T, rows] (pad columns -inf); `matmul`
    (a native kernel over this rank's rows) in place of torch's."""
    logits = matmul(hidden) if matmul is not None else linear(hidden, head.weight).float()
    if head.real_rows < head.rows:
        logits[:, head.real_rows :] = float("-inf")
    return logits


def full_logits(
    hidden: torch.Tensor, head: VocabEmbedding, matmul: Matmul | None = None
) -> torch.Tensor:
    """float32 logits over the whole vocabulary [T, V], the same on every rank."""
    logits = local_logits(hidden, head, matmul)
    if head.tp.size == 1:
        return logits
    return head.tp.all_gather(logits, dim=-1)[:, : head.vocab_size]


def greedy_ids(
    hidden: torch.Tensor,
    head: VocabEmbedding,
    matmul: Matmul | None = None,
    argmax: Matmul | None = None,
) -> torch.Tensor:
    """The argmax token of each row [T], without gathering the logits: each rank's best value and
    id are gathered, and the first rank with the highest value wins (ties go to the lower id,
    as a full argmax would). `argmax` (a native kernel's argmax over this rank's rows) finds the
    local ids without writing logits; their values are then one dot product each."""
    idx = argmax(hidden) if argmax is not None else None
    if idx is not None and int(idx.max()) < head.real_rows:
        best = (hidden.float() * head.weight[idx].float()).sum(dim=-1)
    else:  # no kernel, or a pad row won (every real logit negative): the float path
        best, idx = local_logits(hidden, head, matmul).max(dim=-1)
    if head.tp.size == 1:
        return idx
    pairs = torch.stack([best.double(), (idx + head.start).double()], dim=-1)  # [T, 2]
    gathered = head.tp.all_gather(pairs[None], dim=0)  # [tp, T, 2]
    winner = gathered[:, :, 0].argmax(dim=0)  # first maximum: the lowest rank, the lowest id
    return gathered[winner, torch.arange(len(winner)), 1].long()
