"""Metadata slots: the small block prefill writes after the pages, through the same engine.

Decode owns ``meta_slots`` fixed-size slots in one registered buffer and lends one to each room.
A slot holds ``[u32 payload length][u64 room][msgpack RoomMetadata]``; the room id guards
against a stale write from an earlier room that used the same slot.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np

from .base import RoomMetadata

_HEADER = struct.Struct("<IQ")


def encode_slot(room: int, meta: RoomMetadata, slot_bytes: int) -> bytes:
    """The bytes prefill writes into a slot; raises if the metadata does not fit."""
    payload = msgpack.packb(
        [
            meta.first_token_id,
            meta.logprob,
            [list(t) for t in meta.top_logprobs],
            meta.cached_tokens,
        ]
    )
    data = _HEADER.pack(len(payload), room) + payload
    if len(data) > slot_bytes:
        raise ValueError(
            f"room {room} metadata is {len(data)} bytes, slot holds {slot_bytes} "
            "(raise transfer.meta_slot_bytes or ask for fewer top logprobs)"
        )
    return data


def decode_slot(data: bytes | memoryview, room: int) -> RoomMetadata:
    """Read the metadata written for ``room``; raises ValueError if the slot holds another."""
    length, written_room = _HEADER.unpack_from(data)
    if written_room != room or length == 0 or _HEADER.size + length > len(data):
        raise ValueError(f"metadata slot holds room {written_room}, expected room {room}")
    token, logprob, top, cached = msgpack.unpackb(bytes(data[_HEADER.size : _HEADER.size + length]))
    return RoomMetadata(token, logprob, tuple((int(t), float(p)) for t, p in top), cached)


class SlotPool:
    """A registered array of fixed-size slots, lent out one per room."""

    def __init__(self, num_slots: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.array = np.zeros(num_slots * slot_bytes, dtype=np.uint8)
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def base_ptr(self) -> int:
        return self.array.ctypes.data

    @property
    def num_slots(self) -> int:
        return len(self.array) // self.slot_bytes

    @property
    def free_count(self) -> int:
        return len(self._free)

    def address(self, slot: int) -> int:
        return self.base_ptr + slot * self.slot_bytes

    def view(self, slot: int) -> memoryview:
        return memoryview(self.array)[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    def acquire(self) -> int:
        """Take a cleared slot; raises when every slot is lent out."""
        if not self._free:
            raise RuntimeError(
                f"all {self.num_slots} metadata slots are in use (raise transfer.meta_slots, "
                "or admit fewer concurrent rooms)"
            )
        slot = self._free.pop()
        self.view(slot)[:] = b"\0" * self.slot_bytes
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"metadata slot {slot} released twice")
        self._free.append(slot)
