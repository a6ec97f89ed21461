"""DP attention's step: rank 0's plan split into each rank's own requests, and the sampled rows
gathered back to rank 0.

Every rank runs a forward every step, so that the expert-parallel all-to-alls meet: a rank with
no request of its own runs one padding token (page 0, never handed out; see engine/kv/pool.py).
"""

from __future__ import annotations

import torch

from engine.parallel.group import Parallel
from engine.parallel.step import LogitsMode, StepPlan


def idle_plan(mode: LogitsMode) -> StepPlan:
    """One token at position 0 of the padding page, sampling nothing."""
    return StepPlan([0], [1], [1], [[0]], [], mode)


def is_idle(plan: StepPlan) -> bool:
    """Whether `plan` is `idle_plan`'s: nothing on the padding page, which no request holds."""
    return plan.page_tables == [[0]] and not plan.logit_rows


def split_plan(plan: StepPlan, owners: list[int], ranks: int) -> list[StepPlan]:
    """Each rank's part of `plan`, whose request i belongs to rank owners[i] (owners in rank
    order, so the ranks' sampled rows, concatenated, are the plan's)."""
    if owners != sorted(owners):
        raise ValueError(f"a DP step's requests must come in rank order, got ranks {owners}")
    parts: list[tuple[list[int], list[int], list[int], list[list[int]], list[int]]] = [
        ([], [], [], [], []) for _ in range(ranks)
    ]
    sampled, start = set(plan.logit_rows), 0
    for owner, q, kv, table in zip(owners, plan.q_lens, plan.kv_lens, plan.page_tables):
        ids, q_lens, kv_lens, tables, rows = parts[owner]
        if start + q - 1 in sampled:
            rows.append(len(ids) + q - 1)
        ids += plan.ids[start : start + q]
        q_lens.append(q)
        kv_lens.append(kv)
        tables.append(table)
        start += q
    return [StepPlan(*part, plan.mode) if part[1] else idle_plan(plan.mode) for part in parts]


def gather_rows(tp: Parallel, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's `rows` (counts[r] of them on rank r) concatenated in rank order, on every
    rank: padded to the most rows, gathered, unpadded."""
    most = max(counts)
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[: len(rows)] = rows
    every = tp.all_gather(padded[None], dim=0)
    return torch.cat([every[r, :n] for r, n in enumerate(counts)])
