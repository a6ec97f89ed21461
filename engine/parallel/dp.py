"""DP attention's step: rank 0's plan split into each rank's own requests, and the sampled rows
gathered back to rank 0.

Every rank runs a forward every step, so that the expert-parallel all-to-alls meet: a rank with
no request of its own runs one padding token (page 0, never handed out; see engine/kv/pool.py).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

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
    order, so the ranks' sampled rows, and prompt-logprob rows, concatenated, are the plan's).
    Every part keeps the plan's `prompt_top`: the ranks' reduced rows gather at one width."""
    if owners != sorted(owners):
        raise ValueError(f"a DP step's requests must come in rank order, got ranks {owners}")
    parts = [_Part() for _ in range(ranks)]
    sampled, start = set(plan.logit_rows), 0
    for owner, q, kv, table in zip(owners, plan.q_lens, plan.kv_lens, plan.page_tables):
        part = parts[owner]
        base = len(part.ids)
        if start + q - 1 in sampled:
            part.rows.append(base + q - 1)
        lo = bisect_left(plan.prompt_rows, start)
        hi = bisect_left(plan.prompt_rows, start + q)
        part.prompt_rows += [base + r - start for r in plan.prompt_rows[lo:hi]]
        part.prompt_targets += plan.prompt_targets[lo:hi]
        part.ids += plan.ids[start : start + q]
        part.q_lens.append(q)
        part.kv_lens.append(kv)
        part.tables.append(table)
        start += q
    return [
        StepPlan(p.ids, p.q_lens, p.kv_lens, p.tables, p.rows, plan.mode, p.prompt_rows,
                 p.prompt_targets, plan.prompt_top)
        if p.q_lens else idle_plan(plan.mode)
        for p in parts
    ]  # fmt: skip


@dataclass
class _Part:
    """One rank's share of a step, as `split_plan` gathers it."""

    ids: list[int] = field(default_factory=list)
    q_lens: list[int] = field(default_factory=list)
    kv_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)


def gather_rows(tp: Parallel, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's `rows` (counts[r] of them on rank r) concatenated in rank order, on every
    rank: padded to the most rows, gathered, unpadded."""
    most = max(counts)
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[: len(rows)] = rows
    every = tp.all_gather(padded[None], dim=0)
    return torch.cat([every[r, :n] for r, n in enumerate(counts)])
