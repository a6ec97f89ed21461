"""Expert parallelism's token exchange: each token travels to the ranks that hold its experts and
their results travel back. Two ways, the same sums:

- `dispatch_combine`: sized on the host. Each (token, expert) pair travels on its own, in
  all-to-alls whose split sizes the ranks first tell each other (a host sync), so only real
  pairs move. DP attention's prefill steps, where ranks' token counts differ most, and (TP
  attention) any step but decode where ranks outnumber top_k.
- `exchange_fixed`: fixed capacity, as DeepEP's low-latency mode. Every rank routes the same
  number of rows; each token travels once to every rank (whether or not one of its experts is
  there) with its top-k list masked to that rank's experts, in equal-size all-to-alls, and comes
  back as that rank's weighted partial sum. Sizes follow the shapes alone, so a CUDA graph holds
  it: every decode step's path, in a graph or not (no host sync, one all-to-all fewer). A rank
  sends `ranks x rows` rows each way, where the pair-wise exchange sends `rows x top_k`: no
  more while ranks <= top_k (DeepSeek-V3: top_k 8), so under TP attention, where every rank
  holds the same tokens, prefill takes it too. scripts/bench_ep_exchange.py times both.

```
 rank r sends rank s:  x [rows, H]   and  meta [rows, 2k] = (s's local expert ids | weights),
                                          ids of other ranks' experts -> `local_experts` (none)
 rank s computes:      Σ_k w * expert_k(x) over its own experts, per row  -> [ranks, rows, H]
 rank r sums:          the ranks' partial sums, in rank order
```
"""

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


def exchange_fixed(
    experts: Any,
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    tp: Parallel,
    rows: int,
) -> torch.Tensor:
    """`dispatch_combine`'s sums for this rank's tokens `x` (len(x) <= rows), where every rank
    calls it with the same `rows`: the rest of the rows pad and route nowhere."""
    n, top_k = ids.shape
    pad = rows - n
    if pad < 0:
        raise ValueError(f"{n} tokens exceed the exchange's fixed capacity of {rows} rows")
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        ids = torch.cat([ids, ids.new_full((pad, top_k), -1)])  # owner -1: no rank
        weights = torch.cat([weights, weights.new_zeros(pad, top_k)])
    local_experts = experts.local_experts
    ranks = torch.arange(tp.size, device=x.device)[:, None, None]
    owned = (ids // local_experts)[None] == ranks  # [ranks, rows, k]
    local = torch.where(owned, ids[None] - ranks * local_experts, local_experts)
    meta = torch.cat([local.float(), torch.where(owned, weights[None].float(), 0.0)], dim=-1)
    # NOTE: expert ids travel as float32 beside the weights (exact below 2**24): one exchange
    meta = tp.all_to_all_equal(meta)
    received = tp.all_to_all_equal(x[None].expand(tp.size, -1, -1))
    partial = experts.combine_local(
        received.flatten(0, 1),
        meta[..., top_k:].flatten(0, 1),
        meta[..., :top_k].flatten(0, 1).long(),
    )
    back = tp.all_to_all_equal(partial.view(tp.size, rows, -1))
    return back.float().sum(dim=0)[:n].to(x.dtype)
