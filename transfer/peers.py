"""Who the prefill side writes to: registered decode peers and the registration check."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import Endpoint
from .buffers import KVBuffer
from .compat import KVCompat, compat_errors
from .protocol import PROTOCOL_VERSION, Register, buffers_from_wire
from .ranks import RankKV, Slice, layout_errors, owner_error


@dataclass
class DecodePeer:
    """A registered decode node, as the prefill side knows it."""

    decode_id: str
    peer_key: str
    buffers: tuple[KVBuffer, ...]
    meta_base: int
    meta_slot_bytes: int
    meta_slots: int
    last_seen: float
    ranks: tuple[RankKV, ...] = ()  # the decode node's ranks (rank 0 first)
    plan: tuple[Slice, ...] = ()  # which of our ranks writes what into which of them
    keys: dict[tuple[int, int], str] = field(default_factory=dict)  # (ours, theirs) -> engine key
    session: str = ""  # its transfer engine's address (host:port): where it is, for the logs

    @property
    def label(self) -> str:
        return (
            f"decode {self.decode_id} at {self.session}"
            if self.session
            else f"decode {self.decode_id}"
        )

    @classmethod
    def from_register(cls, msg: Register, peer_key: str) -> DecodePeer:
        buffers = buffers_from_wire(msg.buffers)
        return cls(
            msg.decode_id,
            peer_key,
            buffers,
            msg.meta_base,
            msg.meta_slot_bytes,
            msg.meta_slots,
            time.monotonic(),
            decode_ranks(msg),
            session=msg.session,
        )

    def meta_address(self, slot: int) -> int:
        return self.meta_base + slot * self.meta_slot_bytes

    def request_error(self, dst_pages: tuple[int, ...], meta_slot: int, dst_rank: int = -1) -> str:
        """Why a room request cannot be served into this decode's pool, or into rank
        `dst_rank`'s when a rank owns the room ("" if it can)."""
        owner = owner_error(self.ranks, dst_rank, "decode")
        if owner:
            return owner
        buffers = self.buffers if dst_rank < 0 else self.ranks[dst_rank].buffers
        pool_pages = min((b.num_pages for b in buffers), default=0)
        bad = [p for p in dst_pages if not 0 <= p < pool_pages]
        if bad:
            where = "decode" if dst_rank < 0 else f"decode rank {dst_rank}"
            return f"destination page {bad[0]} out of range ({where} has {pool_pages} pages)"
        if not 0 <= meta_slot < self.meta_slots:
            return f"metadata slot {meta_slot} out of range (decode has {self.meta_slots})"
        return ""


def decode_ranks(msg: Register) -> tuple[RankKV, ...]:
    """The registering decode's ranks; a single-rank decode is its rank 0 alone."""
    if msg.ranks:
        return tuple(RankKV.from_wire(wire) for wire in msg.ranks)
    device = msg.buffers[0][4] if msg.buffers else "cpu"
    endpoint = Endpoint(msg.backend, msg.session, msg.blob, device)
    return (RankKV(0, buffers_from_wire(msg.buffers), endpoint=endpoint),)


def registration_errors(
    msg: Register,
    backend: str,
    compat: KVCompat,
    buffers: Sequence[KVBuffer],
    ranks: Sequence[RankKV] = (),
) -> list[str]:
    """Why this prefill (its `ranks`, rank 0's `buffers`) cannot write into the registering
    decode; empty when it can."""
    if msg.version != PROTOCOL_VERSION:
        return [
            f"protocol version differs: prefill {PROTOCOL_VERSION}, decode {msg.version} "
            "(run the same pdserve version on both)"
        ]
    if msg.backend != backend:
        return [
            f"transfer backend differs: prefill {backend}, decode {msg.backend} "
            "(set transfer.backend alike)"
        ]
    theirs = decode_ranks(msg)
    ours = tuple(ranks) or (RankKV(0, tuple(buffers)),)
    if ours[0].sliced and theirs[0].sliced:  # page bytes differ with the heads a rank holds
        return [*compat_errors(compat, KVCompat(*msg.compat), (), ()), *layout_errors(ours, theirs)]
    errors = compat_errors(compat, KVCompat(*msg.compat), buffers, buffers_from_wire(msg.buffers))
    return errors or layout_errors(ours, theirs)
