"""KV across tensor-parallel layouts, without engines: the slice plan (which source rank writes
which heads into which destination rank) and its descriptors, applied with memmove to head-major
pools and checked head by head."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from transfer.buffers import KVBuffer
from transfer.ranks import (
    RankKV,
    Slice,
    layout_errors,
    owner_error,
    owner_plan,
    slice_descriptors,
    slice_plan,
)

HEADS, PAGE, DIM = 4, 8, 2  # KV heads, tokens per page, bytes per token of one head
HEAD_BYTES = PAGE * DIM
LAYERS = 3


def pools(tp: int, pages: int = 6) -> list[np.ndarray]:
    """tp ranks' pools [buffers, pages, heads/tp, PAGE * DIM] (head-major pages), zeroed."""
    heads = max(HEADS // tp, 1)
    return [np.zeros((LAYERS, pages, heads, HEAD_BYTES), np.uint8) for _ in range(tp)]


def views(arrays: list[np.ndarray], tp: int) -> list[RankKV]:
    out = []
    for rank, pool in enumerate(arrays):
        count = pool.shape[2]
        first = rank * count if tp <= HEADS else rank // (tp // HEADS)
        buffers = tuple(KVBuffer.from_array(pool[b]) for b in range(LAYERS))
        out.append(RankKV(rank, buffers, first, count, HEAD_BYTES))
    return out


def fill(arrays: list[np.ndarray], src: list[RankKV]) -> None:
    """Every byte says (buffer, page, global head): b * 100 + page * 10 + head."""
    for pool, view in zip(arrays, src, strict=True):
        for b in range(LAYERS):
            for p in range(pool.shape[1]):
                for h in range(pool.shape[2]):
                    pool[b, p, h] = b * 100 + p * 10 + view.head_first + h


def run(plan: list[Slice], src: list[RankKV], dst: list[RankKV], sp: list[int], dp: list[int]):
    for s in plan:
        batch = slice_descriptors(s, src[s.src], dst[s.dst], sp, dp)
        for a, b, n in zip(batch.src, batch.dst, batch.lengths, strict=True):
            ctypes.memmove(int(b), int(a), int(n))


@pytest.mark.parametrize(("p", "d"), [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (1, 4)])
def test_every_destination_head_arrives_from_a_rank_that_holds_it(p: int, d: int) -> None:
    src_pools, dst_pools = pools(p), pools(d)
    src, dst = views(src_pools, p), views(dst_pools, d)
    fill(src_pools, src)
    assert layout_errors(src, dst) == []
    plan = slice_plan(src, dst)
    sp, dp = [4, 1, 2], [0, 5, 3]
    run(plan, src, dst, sp, dp)
    for pool, view in zip(dst_pools, dst, strict=True):
        for b in range(LAYERS):
            for s_page, d_page in zip(sp, dp, strict=True):
                for h in range(view.head_count):
                    assert (pool[b, d_page, h] == b * 100 + s_page * 10 + view.head_first + h).all()
    if p == d:  # same layout: each rank its own whole pages, runs merged
        assert plan == [Slice(r, r) for r in range(p)]
    untouched = set(range(6)) - set(dp)
    assert all((pool[:, sorted(untouched)] == 0).all() for pool in dst_pools)


def test_shared_kv_heads_are_spread_over_their_holders() -> None:
    """8 ranks over 4 KV heads: two ranks hold each head; decode ranks read from both."""
    src = views(pools(8), 8)
    dst = views(pools(4), 4)
    assert [s.src for s in slice_plan(src, dst)] == [0, 3, 4, 7]


def replicated(tp: int) -> list[RankKV]:
    """tp ranks holding the same latent cache (head_count 0)."""
    arrays = [np.zeros((LAYERS, 6, 32), np.uint8) for _ in range(tp)]
    return [
        RankKV(r, tuple(KVBuffer.from_array(a[b]) for b in range(LAYERS)))
        for r, a in enumerate(arrays)
    ]


def test_replicated_pools_go_whole_from_one_rank_each() -> None:
    ranks = replicated(2)
    assert slice_plan(ranks, ranks) == [Slice(0, 0), Slice(1, 1)]
    assert slice_plan(ranks[:1], ranks) == [Slice(0, 0), Slice(0, 1)]
    assert slice_plan(ranks, ranks[:1]) == [Slice(0, 0)]


def test_layouts_that_cannot_meet_are_named() -> None:
    src = views(pools(2), 2)
    other = [RankKV(0, src[0].buffers, 0, HEADS, HEAD_BYTES * 2)]
    assert "bytes of one head in a page differ" in layout_errors(src, other)[0]
    partial = [RankKV(0, src[0].buffers, 0, 2, HEAD_BYTES)]
    assert "no prefill rank holds" in layout_errors(partial, views(pools(1), 1))[0]
    flat = [RankKV(0, src[0].buffers)]
    assert "slices KV by heads and the other does not" in layout_errors(src, flat)[0]


def test_owners_keep_a_replicated_plan_to_their_ranks() -> None:
    """DP attention: the owning decode rank only, written by the owning prefill rank."""
    ranks = replicated(2)
    plan = slice_plan(ranks, ranks)
    assert owner_plan(plan, 1, 1) == [Slice(1, 1)]
    assert owner_plan(plan, 0, 1) == [Slice(0, 1)]
    assert owner_plan(plan, 1, -1) == [Slice(1, 0), Slice(1, 1)]
    assert owner_plan(plan, -1, 0) == [Slice(0, 0)]
    assert owner_plan(plan, -1, -1) == plan
    assert owner_error(ranks, 1, "decode") == owner_error(ranks, -1, "decode") == ""
    assert "the decode node has ranks 0..1" in owner_error(ranks, 2, "decode")
    assert "replicated latent cache" in owner_error(views(pools(2), 2), 0, "prefill")
