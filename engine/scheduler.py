"""Continuous batching: which requests compute how many tokens in the next step.

Every step spends a token budget: decoding requests first (one token each), then requests in
the middle of a (chunked) prefill, then new requests from the waiting queue, which are admitted
only when their whole sequence fits in free (or evictable) pages with one page of decode
headroom per running request. When a decoding request needs a page and none is left, the most
recently admitted request is retracted (its pages freed, it goes back to waiting and is
recomputed later), so the pool is never overcommitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from engine.kv.pool import PagePool
from engine.kv.radix import RadixCache
from engine.options import SchedulerConfig
from engine.request import Req, ReqStatus


@dataclass(frozen=True)
class ScheduledBatch:
    """Requests of one step and how many new tokens each computes, in order."""

    reqs: list[Req]
    num_tokens: list[int]

    @property
    def samples(self) -> list[bool]:
        """Whether each request reaches the end of its sequence (and samples) this step."""
        return [r.num_computed + n == r.seq_len for r, n in zip(self.reqs, self.num_tokens)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pool: PagePool, cache: RadixCache | None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.cache = cache
        self.page_size = pool.page_size
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.held: dict[str, Req] = {}  # RESERVED and PARKED requests, by rid

    # ---- queues ------------------------------------------------------------------------------

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        """Whether stepping would compute anything (held requests wait on other nodes)."""
        return bool(self.waiting or self.running)

    def find(self, rid: str) -> Req | None:
        if rid in self.held:
            return self.held[rid]
        for req in (*self.running, *self.waiting):
            if req.rid == rid:
                return req
        return None

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        budget = self.cfg.max_batch_tokens
        reqs: list[Req] = []
        counts: list[int] = []
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not ReqStatus.RUNNING:
                continue  # retracted while making room for an earlier one
            n = min(req.remaining, self.cfg.chunk_size, budget)
            if n == 1 and not self._ensure_pages(req, req.num_computed + 1):
                continue
            reqs.append(req)
            counts.append(n)
            budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.cfg.max_running:
            req = self.waiting[0]
            if not self._admit(req):
                break
            self.waiting.popleft()
            self.running.append(req)
            n = min(req.remaining, self.cfg.chunk_size, budget)
            reqs.append(req)
            counts.append(n)
            budget -= n
        if not reqs:
            return None
        return ScheduledBatch(reqs, counts)

    def advance(self, batch: ScheduledBatch) -> None:
        """Mark the scheduled tokens as computed (call after the model ran)."""
        for req, n in zip(batch.reqs, batch.num_tokens):
            req.num_computed += n

    # ---- pages -------------------------------------------------------------------------------

    def _alloc(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        short = n - self.pool.num_free
        if short > 0 and self.cache is not None:
            self.cache.evict(short)
        return self.pool.alloc(n)

    def _available_pages(self) -> int:
        evictable = self.cache.evictable_pages if self.cache is not None else 0
        return self.pool.num_free + evictable

    def _admit(self, req: Req) -> bool:
        """Match the prefix cache and reserve pages for the whole sequence."""
        matched: list[int] = []
        # NOTE: cached tokens are not computed again, and a prompt's logprobs need their
        # positions computed: such a request takes a cached prefix only up to the first of them
        if self.cache is not None:
            match = self.cache.match_prefix(req.token_slice(0, req.cacheable_len))
            matched = match.pages
            self.cache.lock(match.node)
            req.node = match.node
        need = _ceil_div(req.seq_len, self.page_size) - len(matched)
        headroom = len(self.running)
        pages = self._alloc(need) if self._available_pages() >= need + headroom else None
        if pages is None:
            self._unlock(req)
            return False
        req.page_table = matched + pages
        req.num_tree_pages = len(matched)
        req.num_computed = len(matched) * self.page_size
        if not req.output_ids:
            req.num_cached_prompt = req.num_computed
        req.status = ReqStatus.RUNNING
        return True

    def _ensure_pages(self, req: Req, num_tokens: int) -> bool:
        """Grow req's page table to hold num_tokens, retracting others if the pool is dry."""
        need = _ceil_div(num_tokens, self.page_size) - len(req.page_table)
        while need > 0:
            pages = self._alloc(need)
            if pages is not None:
                req.page_table.extend(pages)
                return True
            victim = self.running[-1]
            self.retract(victim)
            if victim is req:
                return False
        return True

    def retract(self, req: Req) -> None:
        """Give back req's pages and queue it to be recomputed from scratch."""
        self._free_own(req)
        self._unlock(req)
        req.page_table, req.num_tree_pages, req.num_computed = [], 0, 0
        req.status = ReqStatus.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)

    def cache_prefix(self, req: Req) -> None:
        """Put req's computed whole pages into the radix cache and hold them through it."""
        if self.cache is None:
            return
        num_pages = req.num_computed // self.page_size
        if num_pages <= req.num_tree_pages:
            return
        tokens = req.token_slice(0, num_pages * self.page_size)
        result = self.cache.insert(tokens, req.page_table[:num_pages])
        self.pool.free(result.duplicate_pages)
        match = self.cache.match_prefix(tokens)
        self.cache.lock(match.node)
        self._unlock(req)
        req.node = match.node
        req.page_table[:num_pages] = match.pages
        req.num_tree_pages = num_pages

    # ---- PD: pages held outside the batch -----------------------------------------------------

    def reserve(self, req: Req, num_tokens: int) -> bool:
        """Hold pages for num_tokens of req before its KV arrives; False when they don't fit.

        Like admission, leaves a page of decode headroom per running request, so a reservation
        never forces running requests out.
        """
        need = _ceil_div(num_tokens, self.page_size)
        if self._available_pages() < need + len(self.running):
            return False
        pages = self._alloc(need)
        if pages is None:
            return False
        req.page_table, req.num_tree_pages = pages, 0
        req.status = ReqStatus.RESERVED
        self.held[req.rid] = req
        return True

    def activate(self, req: Req) -> None:
        """A reserved request's prompt KV has arrived: it joins the running batch."""
        assert req.status is ReqStatus.RESERVED, f"{req.rid} is {req.status}, not reserved"
        del self.held[req.rid]
        req.num_computed = len(req.prompt_ids)
        req.status = ReqStatus.RUNNING
        self.running.append(req)

    def park(self, req: Req) -> None:
        """Take req out of the batch but keep its pages (a prefill node sends them next)."""
        assert req.status is ReqStatus.RUNNING, f"{req.rid} is {req.status}, not running"
        self.running.remove(req)
        req.status = ReqStatus.PARKED
        self.held[req.rid] = req

    def finish(self, req: Req, reason: str, cache: bool = True) -> None:
        """End req: cache what it computed, free the rest, drop it from the queues."""
        if req.status in (ReqStatus.RESERVED, ReqStatus.PARKED):
            del self.held[req.rid]
            if cache and req.status is ReqStatus.PARKED:
                self.cache_prefix(req)
            self._free_own(req)
            self._unlock(req)
        elif req.status is ReqStatus.RUNNING:
            if cache:
                self.cache_prefix(req)
            self._free_own(req)
            self._unlock(req)
            self.running.remove(req)
        elif req.status is ReqStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
        req.page_table, req.num_tree_pages = [], 0
        req.status = ReqStatus.FINISHED
        req.finish_reason = reason

    def _free_own(self, req: Req) -> None:
        self.pool.free(req.own_pages)
        del req.page_table[req.num_tree_pages :]

    def _unlock(self, req: Req) -> None:
        if self.cache is not None and req.node is not None:
            self.cache.unlock(req.node)
        req.node = None

    # ---- what the engine reads -------------------------------------------------------------

    @property
    def held_count(self) -> int:
        return len(self.held)

    @property
    def total_pages(self) -> int:
        return self.pool.total_pages

    @property
    def free_pages(self) -> int:
        """Pages not held by any request (free or only in the prefix cache)."""
        return self._available_pages()

    def cached_prefix_len(self, tokens: list[int]) -> int:
        """How many leading `tokens` the prefix cache holds now."""
        return self.cache.match_prefix(tokens).num_tokens if self.cache is not None else 0

    def reset_cache(self) -> None:
        """Drop the prefix cache (no request may hold a part of it)."""
        if self.cache is not None:
            self.cache.reset()

    # ---- invariants --------------------------------------------------------------------------

    def held_pages(self) -> Iterable[list[int]]:
        if self.cache is not None:
            yield self.cache.all_pages()
        for req in (*self.running, *self.held.values()):
            yield req.own_pages

    def check_integrity(self) -> None:
        """Every page is free, in the radix cache, or owned by exactly one live request."""
        self.pool.check_integrity(self.held_pages())
        if self.cache is not None:
            self.cache.check_integrity()
        for req in self.waiting:
            assert not req.page_table and req.node is None, f"waiting {req.rid} holds pages"
