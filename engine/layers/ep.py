"""Expert parallelism's token exchange: each (token, expert) pair travels to the rank that holds
the expert and its result travels back, with two all-to-alls each way (rows, then ids)."""

from __future__ import annotations

from typing import Any

import torch

from engine.parallel.group import Parallel


def token_share(num_tokens: int, tp: Parallel) -> tuple[int, int]:
    """The rows [lo, hi) this rank routes when every rank holds the same tokens (sizes differ
    by one at most)."""
    base, extra = divmod(num_tokens, tp.size)
    lo = tp.rank * base + min(tp.rank, extra)
    return lo, lo + base + (tp.rank < extra)


def dispatch_combine(
    experts: Any, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, tp: Parallel
) -> torch.Tensor:
    """Σ_k weights[t, k] * expert_{ids[t, k]}(x[t]) for this rank's tokens `x`, whichever rank
    holds each expert (`experts.compute` runs the ones here)."""
    per_rank = experts.gate_up_proj.shape[0]
    flat = ids.flatten()
    owner = flat // per_rank
    order = owner.argsort(stable=True)
    tokens = order // ids.shape[1]
    send = torch.bincount(owner, minlength=tp.size).tolist()
    recv = tp.exchange_counts(send, x.device)
    rows = tp.all_to_all(x[tokens], send, recv)
    local_ids = tp.all_to_all(flat[order], send, recv) - experts.first_expert
    results = tp.all_to_all(experts.compute(rows, local_ids), recv, send)
    weighted = results.float() * weights.flatten()[order][:, None]
    return torch.zeros_like(x).index_add_(0, tokens, weighted.to(x.dtype))
