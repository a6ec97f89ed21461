"""KV across parallel layouts: which source rank writes which heads into which destination rank,
and the descriptors for it.

Each rank of a tensor-parallel node holds its own pool. A head-sliced pool (MHA/GQA) holds heads
[head_first, head_first + head_count) of `heads_total`, each page head-major: heads [a, b) of
page p of a buffer are the one byte range `base + p * stride + (a - head_first) * head_bytes`,
`(b - a) * head_bytes` long. A replicated pool (MLA's latent; head_count 0) is the same on every
rank. Transfer still knows no models: heads are just equal slices of a page.

The plan: every destination rank gets every head it holds from some source rank that holds it
(spread over the holders when heads are replicated), or, replicated, its whole pages from source
rank d % (source ranks). Same layout on both sides: rank r writes rank r's whole pages.

Owners (DP attention): with replicated pools each rank may serve its own requests from its own
pages, so a room may name the one rank that owns its KV on either side (-1: none). Its writes are
the plan's, kept to the owning destination rank and taken from the owning source rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Endpoint
from .buffers import KVBuffer
from .descriptors import DescriptorBatch, build_descriptors, check_pages
from .protocol import WireBuffer, buffers_from_wire, buffers_to_wire

WireRank = tuple[int, tuple[WireBuffer, ...], int, int, int, str, str, bytes, str]


@dataclass(frozen=True)
class RankKV:
    """One rank's pool as a peer sees it (decode ranks also say where their engine is)."""

    rank: int
    buffers: tuple[KVBuffer, ...]
    head_first: int = 0
    head_count: int = 0  # 0: replicated (every rank holds the same bytes)
    head_bytes: int = 0  # one head's bytes in one page of a buffer
    endpoint: Endpoint | None = None

    @property
    def sliced(self) -> bool:
        return self.head_count > 0

    def holds(self, head: int) -> bool:
        return self.head_first <= head < self.head_first + self.head_count

    def to_wire(self) -> WireRank:
        ep = self.endpoint or Endpoint("", "")
        return (
            self.rank, buffers_to_wire(self.buffers), self.head_first, self.head_count,
            self.head_bytes, ep.backend, ep.session, ep.blob, ep.device,
        )  # fmt: skip

    @staticmethod
    def from_wire(wire: WireRank) -> RankKV:
        rank, buffers, first, count, head_bytes, backend, session, blob, device = wire
        endpoint = Endpoint(backend, session, blob, device) if backend else None
        return RankKV(rank, buffers_from_wire(buffers), first, count, head_bytes, endpoint)


@dataclass(frozen=True)
class Slice:
    """Source rank `src` writes heads [first, first + count) into destination rank `dst`
    (count 0: whole pages)."""

    src: int
    dst: int
    first: int = 0
    count: int = 0


def layout_errors(src: Sequence[RankKV], dst: Sequence[RankKV]) -> list[str]:
    """Why these two layouts cannot exchange pages (empty when they can)."""
    if any(r.sliced for r in src) != any(r.sliced for r in dst):
        return ["one side slices KV by heads and the other does not (serve the same model)"]
    if not src[0].sliced:
        return []
    errors = []
    if src[0].head_bytes != dst[0].head_bytes:
        errors.append(
            f"bytes of one head in a page differ: prefill {src[0].head_bytes}, decode "
            f"{dst[0].head_bytes} (same model, dtype and page size on both sides)"
        )
    missing = [h for d in dst for h in range(d.head_first, d.head_first + d.head_count)
               if not any(s.holds(h) for s in src)]  # fmt: skip
    if missing:
        errors.append(f"decode holds KV head {missing[0]} that no prefill rank holds")
    if len({len(r.buffers) for r in (*src, *dst)}) != 1:
        errors.append("ranks differ in their number of KV buffers (serve the same model)")
    return errors


def slice_plan(src: Sequence[RankKV], dst: Sequence[RankKV]) -> list[Slice]:
    """Every write that fills the destination ranks (see the module docstring)."""
    if not dst[0].sliced:
        return [Slice(src[d.rank % len(src)].rank, d.rank) for d in dst]
    plan: list[Slice] = []
    for d in dst:
        for head in range(d.head_first, d.head_first + d.head_count):
            holders = [s for s in src if s.holds(head)]
            chosen = holders[d.rank % len(holders)].rank
            last = plan[-1] if plan else None
            if (
                last
                and last.dst == d.rank
                and last.src == chosen
                and last.first + last.count == head
            ):
                plan[-1] = Slice(chosen, d.rank, last.first, last.count + 1)
            else:
                plan.append(Slice(chosen, d.rank, head, 1))
    by_rank = {r.rank: r for r in src}, {r.rank: r for r in dst}
    return [_whole_if_same(s, by_rank[0][s.src], by_rank[1][s.dst]) for s in plan]


def owner_error(ranks: Sequence[RankKV], rank: int, side: str) -> str:
    """Why `rank` of the `side` ("prefill" or "decode") node cannot own a room's KV ("" when
    it can, or when it is -1: no owner)."""
    if rank == -1:
        return ""
    if not 0 <= rank < len(ranks):
        return (
            f"{side} rank {rank} cannot own the room: the {side} node has ranks "
            f"0..{len(ranks) - 1} (or -1: no owner)"
        )
    if any(r.sliced for r in ranks):
        return (
            f"{side} rank {rank} cannot own the room: KV is sliced by heads here, and owner "
            "ranks are for DP attention over a replicated latent cache (name no owner: -1)"
        )
    return ""


def owner_plan(plan: Sequence[Slice], src_rank: int, dst_rank: int) -> list[Slice]:
    """A replicated `plan` for one room whose owners are `src_rank` and `dst_rank` (-1: none):
    only the owning destination rank, each from the owning source rank (see owner_error)."""
    return [
        Slice(s.src if src_rank < 0 else src_rank, s.dst, s.first, s.count)
        for s in plan
        if dst_rank < 0 or s.dst == dst_rank
    ]


def _whole_if_same(s: Slice, src: RankKV, dst: RankKV) -> Slice:
    """A slice that is both ranks' every head is a whole-page copy."""
    same = (src.head_first, src.head_count) == (dst.head_first, dst.head_count)
    if same and (s.first, s.count) == (dst.head_first, dst.head_count):
        return Slice(s.src, s.dst)
    return s


def slice_descriptors(
    s: Slice, src: RankKV, dst: RankKV, src_pages: Sequence[int], dst_pages: Sequence[int]
) -> DescriptorBatch:
    """The descriptors of one slice: whole pages (runs merged), or one head range per page
    per buffer."""
    if s.count == 0:
        return build_descriptors(src.buffers, dst.buffers, src_pages, dst_pages)
    sp = np.asarray(src_pages, dtype=np.int64)
    dp = np.asarray(dst_pages, dtype=np.int64)
    if len(sp) != len(dp):
        raise ValueError(f"page count differs: source {len(sp)}, destination {len(dp)}")
    length = s.count * src.head_bytes
    src_off = (s.first - src.head_first) * src.head_bytes
    dst_off = (s.first - dst.head_first) * dst.head_bytes
    parts = []
    for sb, db in zip(src.buffers, dst.buffers, strict=True):
        check_pages(sp, sb.num_pages, "source")
        check_pages(dp, db.num_pages, "destination")
        parts.append(
            (sb.base_ptr + sp * sb.stride + src_off, db.base_ptr + dp * db.stride + dst_off)
        )
    if not parts:
        return DescriptorBatch(*(np.zeros(0, dtype=np.uint64) for _ in range(3)))
    srcs = np.concatenate([p[0] for p in parts]).astype(np.uint64)
    dsts = np.concatenate([p[1] for p in parts]).astype(np.uint64)
    return DescriptorBatch(srcs, dsts, np.full(len(srcs), length, dtype=np.uint64))
