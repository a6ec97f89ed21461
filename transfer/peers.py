"""Who the prefill side writes to: registered decode peers and the registration check."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .buffers import KVBuffer
from .compat import KVCompat, compat_errors
from .protocol import PROTOCOL_VERSION, Register, buffers_from_wire


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
        )

    def meta_address(self, slot: int) -> int:
        return self.meta_base + slot * self.meta_slot_bytes

    def request_error(self, dst_pages: tuple[int, ...], meta_slot: int) -> str:
        """Why a room request cannot be served into this decode's pool ("" if it can)."""
        pool_pages = min((b.num_pages for b in self.buffers), default=0)
        bad = [p for p in dst_pages if not 0 <= p < pool_pages]
        if bad:
            return f"destination page {bad[0]} out of range (decode has {pool_pages} pages)"
        if not 0 <= meta_slot < self.meta_slots:
            return f"metadata slot {meta_slot} out of range (decode has {self.meta_slots})"
        return ""


def registration_errors(
    msg: Register, backend: str, compat: KVCompat, buffers: Sequence[KVBuffer]
) -> list[str]:
    """Why this prefill cannot write into the registering decode; empty when it can."""
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
    return compat_errors(compat, KVCompat(*msg.compat), buffers, buffers_from_wire(msg.buffers))
