"""Unit tests for the page-granular radix prefix cache."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from engine.kv import KVLayout, PagePool, RadixCache, RadixNode

LAYOUT = KVLayout.mha(num_layers=1, num_kv_heads=1, head_dim=2)


def make(num_pages: int = 32, page_size: int = 2) -> tuple[PagePool, RadixCache]:
    pool = PagePool(LAYOUT, num_pages, page_size)
    return pool, RadixCache(pool)


def cache_seq(pool: PagePool, cache: RadixCache, tokens: list[int]) -> list[int]:
    """Allocate pages for `tokens` and insert them as a fresh request would; return the pages."""
    pages = pool.alloc(len(tokens) // pool.page_size)
    assert pages is not None
    result = cache.insert(tokens, pages)
    pool.free(result.duplicate_pages)
    return pages


def check(pool: PagePool, cache: RadixCache, *held: list[int]) -> None:
    cache.check_integrity()
    pool.check_integrity([cache.all_pages(), *held])


def test_match_on_empty_tree() -> None:
    pool, cache = make()
    m = cache.match_prefix([1, 2, 3, 4])
    assert m.pages == [] and m.node is cache.root and m.num_tokens == 0
    assert cache.match_prefix([]).pages == []
    check(pool, cache)


def test_exact_partial_and_page_aligned_match() -> None:
    pool, cache = make(page_size=2)
    pages = cache_seq(pool, cache, [1, 2, 3, 4, 5, 6])
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).pages == pages  # exact
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).pages == pages  # longer query
    assert cache.match_prefix([1, 2, 3, 4, 5]).pages == pages[:2]  # odd tail token dropped
    assert cache.match_prefix([1, 2, 3, 9, 5, 6]).pages == pages[:1]  # mismatch mid-page
    assert cache.match_prefix([1, 9]).pages == []  # first page differs
    assert cache.match_prefix(torch.tensor([1, 2, 3, 4])).num_tokens == 4
    check(pool, cache)


def test_match_splits_node() -> None:
    pool, cache = make(page_size=2)
    pages = cache_seq(pool, cache, [1, 2, 3, 4, 5, 6])
    m = cache.match_prefix([1, 2, 3, 4, 7, 7])
    assert m.pages == pages[:2] and m.node.key == [1, 2, 3, 4]
    (child,) = m.node.children.values()
    assert child.key == [5, 6] and child.pages == pages[2:] and child.parent is m.node
    assert cache.root.children[(1, 2)] is m.node
    check(pool, cache)


def test_insert_returns_existing_and_duplicates() -> None:
    pool, cache = make(page_size=2)
    first = cache_seq(pool, cache, [1, 2, 3, 4])
    own = pool.alloc(3)
    assert own is not None
    r = cache.insert([1, 2, 3, 4, 5, 6], own)
    assert r.num_existing == 4 and r.duplicate_pages == own[:2]
    assert r.node.key == [5, 6] and r.node.pages == own[2:]
    pool.free(r.duplicate_pages)  # the caller's duplicates; the tree took own[2]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).pages == [*first, own[2]]
    # Re-inserting with the tree's own pages (from match_prefix) has no duplicates.
    m = cache.match_prefix([1, 2, 3, 4, 5, 6])
    r = cache.insert([1, 2, 3, 4, 5, 6], m.pages)
    assert (r.num_existing, r.duplicate_pages, r.node) == (6, [], m.node)
    check(pool, cache)


def test_insert_splits_and_branches() -> None:
    pool, cache = make(page_size=2)
    a = cache_seq(pool, cache, [1, 2, 3, 4, 5, 6])
    b = cache_seq(pool, cache, [1, 2, 3, 4, 8, 9])
    assert cache.match_prefix([1, 2, 3, 4, 8, 9]).pages == [*a[:2], b[2]]
    head = cache.root.children[(1, 2)]
    assert head.key == [1, 2, 3, 4] and set(head.children) == {(5, 6), (8, 9)}
    assert cache.cached_pages == 4
    check(pool, cache)


def test_insert_rejects_unaligned_or_free_pages() -> None:
    pool, cache = make(page_size=2)
    with pytest.raises(ValueError, match="whole pages"):
        cache.insert([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="whole pages"):
        cache.insert([1, 2, 3, 4], [1])
    with pytest.raises(ValueError, match="free KV pages"):
        cache.insert([1, 2], [1])
    check(pool, cache)


def test_locks_prevent_eviction() -> None:
    pool, cache = make(page_size=2)
    cache_seq(pool, cache, [1, 2, 3, 4])
    cache_seq(pool, cache, [1, 2, 5, 6])  # shares the page of [1, 2]
    m = cache.match_prefix([1, 2, 3, 4])
    cache.lock(m.node)
    assert cache.protected_pages == 2 and cache.evictable_pages == 1
    assert cache.evict(10) == 1  # only the unlocked branch [5, 6]
    assert cache.match_prefix([1, 2, 5, 6]).pages == m.pages[:1]
    assert cache.evict(10) == 0
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    cache.unlock(m.node)
    with pytest.raises(RuntimeError, match="unlock once per lock"):
        cache.unlock(m.node)
    assert cache.evict(10) == 2
    assert pool.num_free == pool.total_pages
    check(pool, cache)


def test_lru_order_and_exact_pages() -> None:
    pool, cache = make(page_size=2)
    a = cache_seq(pool, cache, [1, 1, 1, 1])
    b = cache_seq(pool, cache, [2, 2, 2, 2])
    c = cache_seq(pool, cache, [3, 3])
    # Touches only a's first page: the split leaves a's tail [1, 1] at its old access time.
    cache.match_prefix([1, 1, 9, 9])
    assert cache.evict(1) == 1 and pool.is_free(a[1]) and not pool.is_free(a[0])
    assert cache.evict(1) == 1 and pool.is_free(b[1]) and not pool.is_free(b[0])  # b's tail
    assert cache.evict(2) == 2 and pool.is_free(b[0]) and pool.is_free(c[0])
    assert not pool.is_free(a[0])  # the most recently used page survives
    assert cache.match_prefix([1, 1, 1, 1]).pages == a[:1]
    assert cache.cached_pages == 1
    check(pool, cache)


def test_parent_becomes_leaf_after_children_go() -> None:
    pool, cache = make(page_size=1)
    cache_seq(pool, cache, [1, 2, 3])
    cache_seq(pool, cache, [1, 2, 4])
    assert cache.evict(2) == 2  # both leaves
    assert cache.cached_pages == 2 and cache.match_prefix([1, 2]).num_tokens == 2
    assert cache.evict(5) == 2
    assert cache.cached_pages == 0 and not cache.root.children
    check(pool, cache)


def test_reset_frees_everything() -> None:
    pool, cache = make(page_size=2)
    cache_seq(pool, cache, [1, 2, 3, 4])
    cache_seq(pool, cache, [5, 6])
    stale = cache.match_prefix([5, 6]).node
    cache.reset()
    assert pool.num_free == pool.total_pages and cache.cached_pages == 0
    with pytest.raises(RuntimeError, match="evicted"):
        cache.lock(stale)
    check(pool, cache)


def test_lru_heap_stays_bounded() -> None:
    pool, cache = make(num_pages=4, page_size=1)
    cache_seq(pool, cache, [1])
    for _ in range(1000):
        cache.match_prefix([1])
    assert len(cache._lru) <= 2 * cache._num_nodes + 65
    check(pool, cache)


@dataclass
class Req:
    tokens: list[int]
    node: RadixNode
    prefix_pages: list[int]  # the tree's, locked through `node`
    own_pages: list[int] = field(default_factory=list)  # the request's, freed or given to the tree


def start(
    pool: PagePool, cache: RadixCache, rng: random.Random, bases: list[list[int]]
) -> Req | None:
    tokens = [
        *rng.choice(bases)[: rng.randint(0, 12)],
        *(rng.randint(0, 3) for _ in range(rng.randint(1, 10))),
    ]
    m = cache.match_prefix(tokens[:-1])
    cache.lock(m.node)
    need = -(-len(tokens) // pool.page_size) - len(m.pages)
    own = pool.alloc(need)
    if own is None and cache.evict(need - pool.num_free) and pool.num_free >= need:
        own = pool.alloc(need)
    if own is None:
        cache.unlock(m.node)
        return None
    return Req(tokens, m.node, m.pages, own)


def grow(pool: PagePool, cache: RadixCache, req: Req) -> None:
    """Cache what the request computed so far and keep it locked (chunked prefill)."""
    aligned = len(req.tokens) // pool.page_size * pool.page_size
    n_pages = aligned // pool.page_size
    pages = [*req.prefix_pages, *req.own_pages][:n_pages]
    r = cache.insert(req.tokens[:aligned], pages)
    pool.free(r.duplicate_pages)
    cache.lock(r.node)
    cache.unlock(req.node)
    tail = req.own_pages[n_pages - len(req.prefix_pages) :]
    req.node, req.prefix_pages, req.own_pages = (
        r.node,
        cache.match_prefix(req.tokens[:aligned]).pages,
        tail,
    )


def finish(pool: PagePool, cache: RadixCache, req: Req) -> None:
    grow(pool, cache, req)
    pool.free(req.own_pages)  # the partial last page never enters the tree
    cache.unlock(req.node)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_random_workload_keeps_integrity(seed: int, page_size: int) -> None:
    rng = random.Random(seed * 31 + page_size)
    pool, cache = make(num_pages=48 // page_size + 4, page_size=page_size)
    bases = [[rng.randint(0, 3) for _ in range(12)] for _ in range(3)]
    running: list[Req] = []
    for _ in range(300):
        op = rng.random()
        if op < 0.4:
            req = start(pool, cache, rng, bases)
            if req is not None:
                running.append(req)
        elif op < 0.55 and running:
            grow(pool, cache, rng.choice(running))
        elif op < 0.85 and running:
            finish(pool, cache, running.pop(rng.randrange(len(running))))
        elif op < 0.95:
            before = pool.num_free
            freed = cache.evict(rng.randint(1, 6))
            assert pool.num_free == before + freed
        else:
            cache.match_prefix(rng.choice(bases))
        check(pool, cache, *(r.own_pages for r in running))
    for req in running:
        finish(pool, cache, req)
    check(pool, cache)
    assert cache.protected_pages == 0
    cached = cache.cached_pages
    assert cache.evict(pool.total_pages) == cached
    assert cache.cached_pages == 0 and pool.num_free == pool.total_pages
    check(pool, cache)
