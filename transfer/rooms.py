"""The room table: forward-only states, per-state deadlines, and release exactly once.

A room is *final* once it reaches SUCCESS or FAILED, and *released* once nothing will touch its
pages again (no write in flight, the peer confirmed or is gone). Release happens exactly once;
the user learns of it from ``pop_finished`` and only then frees the pages.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .base import RoomMetadata, RoomStatus, TransferMetrics, TransferState
from .config import TransferConfig

_TOMBSTONES = 65536


@dataclass
class Room:
    """One room as one side sees it. Mutated only by the side's loop thread."""

    room: int
    state: TransferState = TransferState.BOOTSTRAPPING
    peer: str = ""
    reason: str = ""
    deadline: float = math.inf
    dst_pages: tuple[int, ...] = ()
    src_pages: tuple[int, ...] | None = None
    meta_slot: int = -1
    src_rank: int = -1  # the prefill rank that owns the room's KV (DP attention; -1: none)
    dst_rank: int = -1  # the decode rank that owns it (its pages are dst_pages; -1: none)
    metadata: RoomMetadata | None = None
    metrics: TransferMetrics | None = None
    user_owned: bool = True
    busy: bool = False
    quarantine_s: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)

    def status(self) -> RoomStatus:
        return RoomStatus(
            self.room, self.state, self.reason, self.metadata, self.metrics, self.quarantine_s
        )


class RoomTable:
    """Rooms of one node side; writes come from its loop thread, reads from any thread."""

    def __init__(self, config: TransferConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._rooms: dict[int, Room] = {}
        self._finished: list[RoomStatus] = []
        self._tombstones: OrderedDict[int, RoomStatus] = OrderedDict()
        self._unclaimed: set[int] = set()  # ended before the user opened them (declined, ...)

    def get(self, room: int) -> Room | None:
        return self._rooms.get(room)

    def tombstone(self, room: int) -> RoomStatus | None:
        return self._tombstones.get(room)

    def add(self, room: Room) -> Room:
        with self._lock:
            if room.room in self._rooms:
                raise ValueError(f"room {room.room} is already open")
            self._rooms[room.room] = room
            room.deadline = self._deadline(room.state)
        return room

    def move(self, room: Room, state: TransferState, reason: str = "") -> bool:
        """Move forward (never back); returns False when the move is not allowed."""
        with self._lock:
            if not room.state.can_move_to(state):
                return False
            room.state, room.reason = state, reason
            room.deadline = self._deadline(state)
            return True

    def fail(self, room: Room, reason: str) -> bool:
        return self.move(room, TransferState.FAILED, reason)

    def release(self, room: Room) -> None:
        """Forget a final room; its status goes to ``pop_finished`` if the user opened it."""
        with self._lock:
            if not room.state.is_final or self._rooms.get(room.room) is not room:
                raise RuntimeError(f"room {room.room} released twice or before it ended")
            del self._rooms[room.room]
            status = room.status()
            if room.user_owned:
                self._finished.append(status)
            else:
                self._unclaimed.add(room.room)
            self._tombstones[room.room] = status
            while len(self._tombstones) > _TOMBSTONES:
                self._unclaimed.discard(self._tombstones.popitem(last=False)[0])

    def claim(self, room: int) -> bool:
        """The user opens a room that ended before (decode declined or aborted it first): its
        end goes to ``pop_finished`` now. False when no such room is waiting to be claimed."""
        with self._lock:
            if room not in self._unclaimed:
                return False
            self._unclaimed.discard(room)
            self._finished.append(self._tombstones[room])
            return True

    def expired(self, now: float) -> list[Room]:
        with self._lock:
            return [r for r in self._rooms.values() if r.deadline <= now]

    def rooms(self, peer: str | None = None) -> list[Room]:
        with self._lock:
            return [r for r in self._rooms.values() if peer is None or r.peer == peer]

    def status(self, room: int) -> RoomStatus | None:
        with self._lock:
            live = self._rooms.get(room)
            return live.status() if live else self._tombstones.get(room)

    def pop_finished(self) -> list[RoomStatus]:
        with self._lock:
            done, self._finished = self._finished, []
            return done

    def open_count(self) -> int:
        with self._lock:
            return len(self._rooms)

    def timeout_reason(self, room: Room) -> str:
        seconds, name = self._config.timeout_for(room.state.name)
        return f"timed out in {room.state.name} after {seconds:g}s (raise transfer.{name})"

    def _deadline(self, state: TransferState) -> float:
        if state.is_final:
            return math.inf
        return time.monotonic() + self._config.timeout_for(state.name)[0]
