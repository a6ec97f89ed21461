"""Radix prefix cache over token ids, page-granular, with LRU eviction of unreferenced leaves.

A node's key is a run of token ids whose length is a multiple of `page_size`; its `pages` hold
the KV of those tokens, one page per `page_size` tokens. Children are keyed by the tokens of
their first page, so siblings never share a first page and a page is the unit of sharing.

```
 page_size = 4
 root
  └─ key [a0..a7]          pages [3, 9]       a cached 8-token prefix (2 pages)
       ├─ key [b0..b3]     pages [4]          two continuations of it
       └─ key [c0..c7]     pages [7, 2]
```

Ownership: pages in the tree belong to the tree until `evict`/`reset` returns them to the pool.
A request that matched a prefix must `lock` the matched node until it stops reading those
pages; locked nodes (and, since a lock runs up to the root, their ancestors) are never evicted.

Typical scheduler use (SGLang-style):

```
 m = cache.match_prefix(prompt[:-1])    # leave >= 1 token to compute (the last logits)
 cache.lock(m.node)                      # m.pages are now safe to read
 ...allocate own pages for positions >= len(m.pages) * page_size, prefill...
 r = cache.insert(aligned_tokens, m.pages + own_pages)
 pool.free(r.duplicate_pages)            # own pages that another request cached first
 cache.unlock(m.node)                    # and cache.lock(r.node) if the request goes on
```
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv.pool import PagePool


class RadixNode:
    """One edge of the tree: a page-aligned token run and its KV pages."""

    __slots__ = ("children", "key", "last_access", "lock_ref", "pages", "parent")

    def __init__(self, key: list[int], pages: list[int], parent: RadixNode | None) -> None:
        self.key = key
        self.pages = pages
        self.parent = parent
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.lock_ref = 0
        self.last_access = 0

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return f"RadixNode(tokens={len(self.key)}, pages={self.pages}, lock_ref={self.lock_ref})"


@dataclass(frozen=True)
class MatchResult:
    """`pages` cover the first `num_tokens = len(pages) * page_size` tokens; `node` ends them."""

    pages: list[int]
    node: RadixNode
    num_tokens: int


@dataclass(frozen=True)
class InsertResult:
    """What `insert` found and kept.

    num_existing: leading tokens that were already cached (a multiple of page_size).
    node: the node that ends the inserted path (lock it to keep the whole prefix).
    duplicate_pages: the caller's pages for the already-cached range that are not the tree's
        own pages. The tree did not take them: the caller frees exactly these.
    """

    num_existing: int
    node: RadixNode
    duplicate_pages: list[int]


def _as_token_list(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        return [int(t) for t in tokens.flatten().tolist()]
    return [int(t) for t in tokens]


class RadixCache:
    """Page-granular radix tree prefix cache over a `PagePool`."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = RadixNode([], [], None)
        self._clock = 0  # logical time for LRU; deterministic, unlike wall time
        self._evictable_pages = 0  # pages in nodes with lock_ref == 0
        self._protected_pages = 0  # pages in locked nodes
        self._num_nodes = 0  # excluding the root
        # Lazy min-heap of (last_access, seq, node) eviction candidates. An entry is live only
        # while its node is an unlocked leaf still in the tree with that same last_access;
        # stale entries are dropped when popped and the heap is rebuilt when they pile up.
        self._lru: list[tuple[int, int, RadixNode]] = []
        self._seq = 0

    # ---- sizes -----------------------------------------------------------------------------

    @property
    def evictable_pages(self) -> int:
        """Pages `evict` could free now (those of unlocked nodes)."""
        return self._evictable_pages

    @property
    def protected_pages(self) -> int:
        """Pages held by locked nodes."""
        return self._protected_pages

    @property
    def cached_pages(self) -> int:
        return self._evictable_pages + self._protected_pages

    def all_pages(self) -> list[int]:
        """Every page the tree owns (for `PagePool.check_integrity`)."""
        return [page for node in self._nodes() for page in node.pages]

    # ---- match / insert --------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int] | torch.Tensor) -> MatchResult:
        """Longest cached page-aligned prefix of `tokens`.

        Splits a node when the match ends inside it, so `node` covers exactly the matched
        pages. Marks the matched path as recently used. An unmatched query returns the root
        and no pages. Lock `node` before the next `evict` if you will read the pages.
        """
        tokens = _as_token_list(tokens)
        node, pages, _ = self._walk(tokens, len(tokens) // self.page_size * self.page_size)
        return MatchResult(pages, node, len(pages) * self.page_size)

    def insert(
        self, tokens: Sequence[int] | torch.Tensor, pages: Sequence[int] | torch.Tensor
    ) -> InsertResult:
        """Cache `pages` as the KV of `tokens`: whole pages, one page per `page_size` tokens.

        Ownership rule: the tree takes the caller's pages for the newly cached part, tokens
        [num_existing, len(tokens)). For the already-cached part [0, num_existing) the tree keeps
        its own pages; the caller's pages there are either the tree's own (they came from
        `match_prefix`, so nothing to do) or the caller's duplicates, listed in
        `duplicate_pages`, which the caller still owns and must free.

        The returned `node` ends the inserted path; a request that goes on (chunked prefill)
        locks it and unlocks the node it held before. Marks the path as recently used.
        """
        tokens, pages = _as_token_list(tokens), _as_token_list(pages)
        self._check_insert_args(tokens, pages)
        node, tree_pages, num_existing = self._walk(tokens, len(tokens))
        duplicates = [
            mine
            for mine, cached in zip(pages[: len(tree_pages)], tree_pages, strict=True)
            if mine != cached
        ]
        if num_existing < len(tokens):
            node = self._add_leaf(node, tokens[num_existing:], pages[len(tree_pages) :])
        return InsertResult(num_existing, node, duplicates)

    def _check_insert_args(self, tokens: list[int], pages: list[int]) -> None:
        ps = self.page_size
        if len(tokens) % ps or len(pages) != len(tokens) // ps:
            raise ValueError(
                f"insert needs whole pages: {len(tokens)} tokens and {len(pages)} pages with "
                f"page_size {ps} (insert tokens[: len(tokens) // {ps} * {ps}] and one page each)"
            )
        free = [p for p in pages if self.pool.is_free(p)]
        if free:
            raise ValueError(
                f"insert got free KV pages {free[:8]}; insert only pages allocated from the pool"
            )

    def _walk(self, tokens: list[int], limit: int) -> tuple[RadixNode, list[int], int]:
        """Follow tokens[:limit] down the tree: (last node, its path's pages, tokens matched)."""
        self._clock += 1
        node, pages, pos = self.root, [], 0
        while pos < limit:
            child = node.children.get(tuple(tokens[pos : pos + self.page_size]))
            if child is None:
                break
            matched = self._match_len(child.key, tokens, pos, limit)
            if matched < len(child.key):
                child = self._split(child, matched)
            child.last_access = self._clock
            self._push_if_evictable(child)
            node, pos = child, pos + matched
            pages.extend(child.pages)
        return node, pages, pos

    def _match_len(self, key: list[int], tokens: list[int], start: int, limit: int) -> int:
        """Tokens of `key` matched by tokens[start:limit], in whole pages."""
        ps = self.page_size
        n = min(len(key), limit - start) // ps * ps
        if key[:n] == tokens[start : start + n]:
            return n
        matched = ps  # the first page matched: that is how the child was found
        while key[matched : matched + ps] == tokens[start + matched : start + matched + ps]:
            matched += ps
        return matched

    def _split(self, node: RadixNode, at: int) -> RadixNode:
        """Cut `node` after `at` tokens; return the new upper part (the lower keeps `node`).

        ```
         parent -> node[k0 .. k_at .. k_end]   =>   parent -> head[k0 .. k_at) -> node[k_at .. k_end]
        ```
        """
        ps = self.page_size
        assert node.parent is not None and 0 < at < len(node.key) and at % ps == 0
        head = RadixNode(node.key[:at], node.pages[: at // ps], node.parent)
        head.lock_ref, head.last_access = node.lock_ref, node.last_access
        node.parent.children[tuple(head.key[:ps])] = head
        node.key, node.pages, node.parent = node.key[at:], node.pages[at // ps :], head
        head.children[tuple(node.key[:ps])] = node
        self._num_nodes += 1
        return head

    def _add_leaf(self, parent: RadixNode, key: list[int], pages: list[int]) -> RadixNode:
        leaf = RadixNode(key, pages, parent)
        leaf.last_access = self._clock
        parent.children[tuple(key[: self.page_size])] = leaf
        self._num_nodes += 1
        self._evictable_pages += leaf.num_pages
        self._push_if_evictable(leaf)
        return leaf

    # ---- locks -----------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Pin `node` and its ancestors: none of their pages is evicted until `unlock(node)`."""
        self._check_attached(node)
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable_pages -= node.num_pages
                self._protected_pages += node.num_pages
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        """Undo one `lock(node)`."""
        self._check_attached(node)
        if node is not self.root and node.lock_ref <= 0:
            raise RuntimeError(f"unlock of an unlocked radix node {node}: unlock once per lock")
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable_pages += node.num_pages
                self._protected_pages -= node.num_pages
                self._push_if_evictable(node)
            node = node.parent

    def _check_attached(self, node: RadixNode) -> None:
        if node is not self.root and node.parent is None:
            raise RuntimeError(
                f"radix node {node} was evicted; lock the node from match_prefix/insert before "
                "anything can evict it"
            )

    # ---- eviction --------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` pages to the pool from unlocked leaves, least recently used first.

        Pages come off the tail of a leaf, so exactly min(num_pages, evictable_pages) are freed;
        a parent whose children are all gone becomes a leaf candidate. Returns pages freed.
        """
        freed = 0
        while freed < num_pages and self._lru:
            access, _, node = heapq.heappop(self._lru)
            if access == node.last_access and self._is_evictable_leaf(node):
                freed += self._trim_leaf(node, min(node.num_pages, num_pages - freed))
        return freed

    def _trim_leaf(self, leaf: RadixNode, n: int) -> int:
        """Free the last `n` pages of an unlocked leaf; drop the leaf when none remain."""
        freed = leaf.pages[len(leaf.pages) - n :]
        self.pool.free(freed)
        self._evictable_pages -= n
        if n < leaf.num_pages:
            leaf.pages = leaf.pages[: len(leaf.pages) - n]
            leaf.key = leaf.key[: len(leaf.pages) * self.page_size]
            self._push_if_evictable(leaf)
            return n
        parent = leaf.parent
        assert parent is not None
        del parent.children[tuple(leaf.key[: self.page_size])]
        leaf.parent, leaf.pages, leaf.key = None, [], []
        self._num_nodes -= 1
        self._push_if_evictable(parent)
        return n

    def _is_evictable_leaf(self, node: RadixNode) -> bool:
        return (
            node is not self.root
            and node.parent is not None
            and not node.children
            and node.lock_ref == 0
        )

    def _push_if_evictable(self, node: RadixNode) -> None:
        if not self._is_evictable_leaf(node):
            return
        self._seq += 1
        heapq.heappush(self._lru, (node.last_access, self._seq, node))
        if len(self._lru) > 2 * self._num_nodes + 64:
            self._rebuild_lru()

    def _rebuild_lru(self) -> None:
        leaves = [n for n in self._nodes() if self._is_evictable_leaf(n)]
        self._lru = [(n.last_access, i, n) for i, n in enumerate(leaves, start=self._seq + 1)]
        self._seq += len(leaves)
        heapq.heapify(self._lru)

    def reset(self) -> None:
        """Free every cached page and empty the tree. Refuses while anything is locked."""
        if self._protected_pages:
            raise RuntimeError(
                f"cannot reset the radix cache: {self._protected_pages} pages are locked "
                "(finish or abort the requests that hold them first)"
            )
        self.pool.free(self.all_pages())
        for node in self._nodes():
            node.parent = None
        self._init_tree()

    # ---- invariants ------------------------------------------------------------------------

    def _nodes(self) -> list[RadixNode]:
        """Every node but the root, parents before children."""
        out: list[RadixNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def check_integrity(self) -> None:
        """Raise AssertionError unless the tree's structure, locks and page counts agree."""
        nodes = self._nodes()
        if self.root.lock_ref != 0 or self.root.key or self.root.pages:
            raise AssertionError("the radix root must have no key, no pages and no lock")
        for node in [self.root, *nodes]:
            self._check_node(node)
        self._check_counts(nodes)
        self._check_pages(nodes)
        self._check_lru(nodes)

    def _check_node(self, node: RadixNode) -> None:
        ps = self.page_size
        if node is not self.root and (not node.key or len(node.key) % ps):
            raise AssertionError(f"{node}: key length {len(node.key)} is not whole pages of {ps}")
        if len(node.pages) * ps != len(node.key):
            raise AssertionError(f"{node}: {len(node.key)} tokens but {len(node.pages)} pages")
        if node.lock_ref < 0:
            raise AssertionError(f"{node}: negative lock_ref")
        for first, child in node.children.items():
            if child.parent is not node or tuple(child.key[:ps]) != first:
                raise AssertionError(f"{child}: wrong parent link or child key {first}")
        if node is not self.root and node.lock_ref < sum(
            c.lock_ref for c in node.children.values()
        ):
            raise AssertionError(f"{node}: lock_ref below the sum of its children's")

    def _check_counts(self, nodes: list[RadixNode]) -> None:
        locked = sum(n.num_pages for n in nodes if n.lock_ref)
        unlocked = sum(n.num_pages for n in nodes if not n.lock_ref)
        if (locked, unlocked) != (self._protected_pages, self._evictable_pages):
            raise AssertionError(
                f"page counts drifted: locked {locked} vs {self._protected_pages}, "
                f"unlocked {unlocked} vs {self._evictable_pages}"
            )
        if len(nodes) != self._num_nodes:
            raise AssertionError(f"node count drifted: {len(nodes)} vs {self._num_nodes}")

    def _check_pages(self, nodes: list[RadixNode]) -> None:
        seen: set[int] = set()
        for node in nodes:
            for page in node.pages:
                if page in seen:
                    raise AssertionError(f"KV page {page} appears twice in the radix tree")
                if self.pool.is_free(page):
                    raise AssertionError(
                        f"KV page {page} is in the radix tree but free in the pool"
                    )
                seen.add(page)

    def _check_lru(self, nodes: list[RadixNode]) -> None:
        live = {(id(n), access) for access, _, n in self._lru}
        for node in nodes:
            if self._is_evictable_leaf(node) and (id(node), node.last_access) not in live:
                raise AssertionError(f"{node}: an unlocked leaf with no LRU entry (never evicted)")
