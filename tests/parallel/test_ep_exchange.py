"""Expert parallelism's two token exchanges (engine/layers/ep.py) against one rank holding every
expert: two ranks over real gloo groups, one thread each. The fixed-capacity exchange (a graph's
decode step) gives the same sums as the host-sized one, with padding rows, ranks routing
different token counts, and tokens none of whose experts live on a rank. Under TP attention
with no more ranks than top_k, an engine's every step takes the fixed capacity."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from engine.layers import moe
from engine.layers.ep import dispatch_combine, exchange_fixed
from engine.layers.moe import RoutedExperts
from engine.parallel.group import Parallel
from engine.parallel.ranks import new_group
from tests.test_deepseek import VOCAB as DEEPSEEK_VOCAB
from tests.test_engine_oracle import GREEDY, assert_matches_hf, new_llm, random_prompts
from tests.test_fused_moe import HIDDEN, routing

EXPERTS, TOP_K, RANKS = 8, 3, 2


def full_experts() -> RoutedExperts:
    gen = torch.Generator().manual_seed(0)
    cfg = routing(TOP_K, EXPERTS)
    experts = RoutedExperts(HIDDEN, cfg, Parallel.single(), use_fused=False)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) / 6)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) / 5)
    return experts


def rank_experts(full: RoutedExperts, tp: Parallel) -> RoutedExperts:
    experts = RoutedExperts(HIDDEN, routing(TOP_K, EXPERTS), tp, use_fused=False)
    mine = slice(experts.first_expert, experts.first_expert + experts.local_experts)
    with torch.no_grad():
        experts.gate_up_proj.copy_(full.gate_up_proj[mine])
        experts.down_proj.copy_(full.down_proj[mine])
    return experts


def tokens(rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(n, HIDDEN, generator=gen)
    ids = torch.zeros(n, TOP_K, dtype=torch.long)
    for row in ids:
        row.copy_(torch.randperm(EXPERTS, generator=gen)[:TOP_K])
    if n:
        ids[0] = torch.tensor([0, 1, 2])  # every expert on rank 0: rank 1 adds nothing
    return x, torch.rand(n, TOP_K, generator=gen), ids


def count_exchanges(monkeypatch) -> dict[str, int]:
    """Counts of this process's MoE layers' calls of each exchange, as they happen."""
    calls = {"fixed": 0, "counted": 0}

    def counting(name, real):
        def wrapped(*args, **kw):
            calls[name] += 1
            return real(*args, **kw)

        return wrapped

    monkeypatch.setattr(moe, "exchange_fixed", counting("fixed", moe.exchange_fixed))
    monkeypatch.setattr(moe, "dispatch_combine", counting("counted", moe.dispatch_combine))
    return calls


def on_ranks(run, counts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """run(experts, x, weights, ids, tp) on each rank, in threads: (its result, the want)."""
    full, store = full_experts(), dist.HashStore()

    def rank_main(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        group = new_group(store, "ep", rank, RANKS, timedelta(seconds=30), "cpu")
        tp = Parallel(rank, RANKS, group, ep=True)
        x, weights, ids = tokens(rank, counts[rank])
        with torch.no_grad():
            return run(rank_experts(full, tp), x, weights, ids, tp), full(x, weights, ids)

    with ThreadPoolExecutor(RANKS) as pool:
        return list(pool.map(rank_main, range(RANKS)))


@pytest.mark.parametrize(("counts", "rows"), [([5, 5], 5), ([5, 2], 7), ([0, 3], 3)])
def test_fixed_capacity_exchange_equals_one_rank(counts: list[int], rows: int) -> None:
    def fixed(experts, x, weights, ids, tp):
        return exchange_fixed(experts, x, weights, ids, tp, rows)

    for got, want in on_ranks(fixed, counts):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_host_sized_exchange_equals_one_rank() -> None:
    for got, want in on_ranks(dispatch_combine, [6, 2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fixed_capacity_sends_every_token_once_to_each_rank() -> None:
    """What a rank receives: every rank's rows in rank order, each with the rank's own local
    expert ids, and `local_experts` (none) for the picks another rank holds."""
    received: dict[int, torch.Tensor] = {}

    def spy(experts, x, weights, ids, tp):
        original = experts.combine_local

        def combine_local(rows, w, local_ids, skips=True):
            received[tp.rank] = local_ids
            return original(rows, w, local_ids, skips)

        experts.combine_local = combine_local
        return exchange_fixed(experts, x, weights, ids, tp, 4)

    on_ranks(spy, [4, 4])
    per_rank, none = EXPERTS // RANKS, EXPERTS // RANKS
    for rank, local_ids in received.items():
        assert local_ids.shape == (RANKS * 4, TOP_K)
        for sender in range(RANKS):
            _, _, ids = tokens(sender, 4)
            mine = ids // per_rank == rank
            want = torch.where(mine, ids - rank * per_rank, none)
            assert torch.equal(local_ids[sender * 4 : sender * 4 + 4], want)
    assert (received[1][[0, 4]] == none).all()  # first tokens: experts 0-2, all on rank 0


def test_tp_attention_prefill_takes_the_fixed_capacity_too(make_tiny, monkeypatch) -> None:
    """Ranks (2) <= top_k (2): each token once to each rank moves no more than once per pick,
    so prefill exchanges at the fixed capacity as decode does (rank 0's calls counted; the
    other rank's must pair up, or the tokens would not match)."""
    calls = count_exchanges(monkeypatch)
    path = make_tiny("deepseek_v3", "deepseek", layers=2)
    with new_llm(path, tp_size=2, ep_size=2, dist_timeout_s=30) as llm:
        prompts = random_prompts([9, 21], DEEPSEEK_VOCAB, seed=3)
        assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))
        layers = sum(isinstance(m, moe.MoE) for m in llm.engine.runner.model.modules())
    assert calls == {"fixed": layers * GREEDY.max_tokens, "counted": 0}
