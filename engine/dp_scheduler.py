"""DP attention's scheduling: one `Scheduler` per attention rank, each over that rank's pool.

Under DP attention every rank of the group runs attention for its own requests over its own
latent cache, so a request lives on one rank (`Req.dp_rank`) and its page ids are that rank's.
Rank 0 schedules for all of them: it keeps each rank's allocator and radix cache (rank 0's pool
holds the real buffers; the others are page bookkeeping over `meta` tensors, which take no
memory), gives each new request to the least loaded rank (a rank whose cache holds more of the
prompt wins a tie), and a step is every rank's batch together, in rank order.

`DPScheduler` answers what the engine asks of a `Scheduler`; calls about one request go to the
scheduler of its rank.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Sequence

from engine.kv.pool import PagePool
from engine.kv.radix import RadixCache
from engine.options import SchedulerConfig
from engine.request import Req
from engine.scheduler import ScheduledBatch, Scheduler


def rank_pools(pool: PagePool, ranks: int) -> list[PagePool]:
    """Rank 0's `pool`, then a bookkeeping pool of the same size for each other rank."""
    others = [
        PagePool(pool.layout, pool.total_pages, pool.page_size, "meta") for _ in range(1, ranks)
    ]
    return [pool, *others]


class DPScheduler:
    def __init__(self, cfg: SchedulerConfig, pools: Sequence[PagePool], prefix_cache: bool):
        self.ranks = [
            Scheduler(cfg, pool, RadixCache(pool) if prefix_cache else None) for pool in pools
        ]
        self.page_size = pools[0].page_size
        self.placed = [0] * len(self.ranks)  # requests given to each rank so far

    # ---- placement -------------------------------------------------------------------------

    def _by_load(self, req: Req) -> list[int]:
        """Ranks, the best home for `req` first: fewest requests, then most of the prompt
        cached, then fewest requests placed so far (requests arriving one at a time, each gone
        before the next, take the ranks in turn), then the lowest rank."""
        prompt = req.token_slice(0, req.seq_len - 1)

        def key(r: int) -> tuple[int, int, int, int]:
            s = self.ranks[r]
            load = len(s.running) + len(s.waiting) + len(s.held)
            return load, -s.cached_prefix_len(prompt), self.placed[r], r

        return sorted(range(len(self.ranks)), key=key)

    def add(self, req: Req) -> None:
        req.dp_rank = self._by_load(req)[0]
        self.ranks[req.dp_rank].add(req)
        self.placed[req.dp_rank] += 1

    def reserve(self, req: Req, num_tokens: int) -> bool:
        """Hold the pages on the best rank that has room for them."""
        for r in self._by_load(req):
            if self.ranks[r].reserve(req, num_tokens):
                req.dp_rank = r
                self.placed[r] += 1
                return True
        return False

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        reqs: list[Req] = []
        counts: list[int] = []
        for s in self.ranks:
            batch = s.schedule()
            if batch is not None:
                reqs += batch.reqs
                counts += batch.num_tokens
        return ScheduledBatch(reqs, counts) if reqs else None

    def advance(self, batch: ScheduledBatch) -> None:
        self.ranks[0].advance(batch)  # only counts tokens: the same for every rank

    # ---- one request: its rank's scheduler ---------------------------------------------------

    def activate(self, req: Req) -> None:
        self.ranks[req.dp_rank].activate(req)

    def park(self, req: Req) -> None:
        self.ranks[req.dp_rank].park(req)

    def finish(self, req: Req, reason: str, cache: bool = True) -> None:
        self.ranks[req.dp_rank].finish(req, reason, cache)

    def cache_prefix(self, req: Req) -> None:
        self.ranks[req.dp_rank].cache_prefix(req)

    def find(self, rid: str) -> Req | None:
        return next((r for s in self.ranks if (r := s.find(rid)) is not None), None)

    # ---- the whole -------------------------------------------------------------------------

    @property
    def held(self) -> ChainMap[str, Req]:
        return ChainMap(*(s.held for s in self.ranks))

    @property
    def running(self) -> list[Req]:
        return [r for s in self.ranks for r in s.running]

    @property
    def waiting(self) -> list[Req]:
        return [r for s in self.ranks for r in s.waiting]

    @property
    def held_count(self) -> int:
        return sum(len(s.held) for s in self.ranks)

    @property
    def total_pages(self) -> int:
        return sum(s.total_pages for s in self.ranks)

    @property
    def free_pages(self) -> int:
        return sum(s.free_pages for s in self.ranks)

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.ranks)

    def describe(self) -> list[dict[str, int]]:
        """Each attention rank's load, for /get_server_info."""
        return [
            {"placed": n, "running": len(s.running), "waiting": len(s.waiting),
             "held": len(s.held), "free_pages": s.free_pages}
            for n, s in zip(self.placed, self.ranks)
        ]  # fmt: skip

    def cached_prefix_len(self, tokens: list[int]) -> int:
        return max(s.cached_prefix_len(tokens) for s in self.ranks)

    def reset_cache(self) -> None:
        for s in self.ranks:
            s.reset_cache()

    def check_integrity(self) -> None:
        for s in self.ranks:
            s.check_integrity()
