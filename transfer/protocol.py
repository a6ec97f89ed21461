"""Control-plane messages between decode and prefill: typed dataclasses, msgpack, a type tag.

Decode opens a ZMQ DEALER to the prefill node's bootstrap ROUTER and says, in order::

    decode                                   prefill
      Register(endpoint, buffers, compat, ranks) ->
                                          <- RegisterReply(error="")      (or the mismatch)
      RoomRequest(room, dst_pages, slot, dst_rank) ->
                                          <- RoomUpdate(WAITING_FOR_INPUT)
                                          <- RoomUpdate(TRANSFERRING)
                                          <- RoomUpdate(SUCCESS | FAILED, reason, metrics)
      RoomAbort(room, reason)             ->  (prefill answers with a final RoomUpdate once it
                                               has stopped writing into the room)
      Heartbeat                           <-> HeartbeatReply

A RoomRequest's ``dst_rank`` (DP attention: one decode rank owns the room's KV) names the only
decode rank prefill writes, its ``dst_pages`` being that rank's pages; -1 fills every decode rank.

Every value is a msgpack native (int, float, str, bytes, tuples); nothing is ever pickled.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import TransferMetrics, TransferState
from .buffers import KVBuffer
from .codec import MessageCodec
from .compat import KVCompat

# 3: Register says every decode rank (tensor-parallel layouts)
# 4: RoomRequest.dst_rank, the decode rank that owns a room's KV (DP attention)
PROTOCOL_VERSION = 4

WireBuffer = tuple[int, int, int, int, str]


class ProtocolError(ValueError):
    """A control message that does not decode into a known type."""


@dataclass(frozen=True)
class Register:
    """Decode introduces itself to a prefill node (once per peer)."""

    version: int
    decode_id: str
    backend: str
    session: str
    blob: bytes
    buffers: tuple[WireBuffer, ...]
    compat: tuple[str, str, int, int, str]
    meta_base: int
    meta_slot_bytes: int
    meta_slots: int
    # every rank of the decode node: RankKV.to_wire() (transfer/ranks.py); () is one rank
    ranks: tuple = ()


@dataclass(frozen=True)
class RegisterReply:
    """Prefill's answer to Register: an empty error means registered."""

    error: str


@dataclass(frozen=True)
class RoomRequest:
    """Decode reserved ``dst_pages`` and metadata slot ``meta_slot`` for ``room``; the pages are
    decode rank ``dst_rank``'s, the room's owner, or (-1) those of every decode rank."""

    room: int
    dst_pages: tuple[int, ...]
    meta_slot: int
    dst_rank: int = -1


@dataclass(frozen=True)
class RoomAbort:
    """Decode gives up on a room; prefill must stop writing and confirm with a final update."""

    room: int
    reason: str


@dataclass(frozen=True)
class RoomDecline:
    """Decode will not ask for this room (it prefills the request itself, or the room is not
    one it can ask for): prefill drops it."""

    room: int
    reason: str


@dataclass(frozen=True)
class RoomUpdate:
    """Prefill reports a room's state; a final one means prefill no longer writes into it."""

    room: int
    state: int
    reason: str = ""
    metrics: tuple[int, int, int, float] = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class Heartbeat:
    """Decode is alive (sent to every prefill peer each heartbeat interval)."""


@dataclass(frozen=True)
class HeartbeatReply:
    """Prefill is alive."""


@dataclass(frozen=True)
class UnknownPeer:
    """Prefill does not know this decode (it restarted, or timed the decode out)."""

    reason: str


Message = (
    Register
    | RegisterReply
    | RoomRequest
    | RoomAbort
    | RoomDecline
    | RoomUpdate
    | Heartbeat
    | HeartbeatReply
    | UnknownPeer
)
CODEC = MessageCodec(Message.__args__, error=ProtocolError, use_list=False)


def encode(msg: Message) -> bytes:
    """Pack a message (see transfer/codec.py)."""
    return CODEC.encode(msg)


def decode(data: bytes) -> Message:
    """Unpack a message; raise ProtocolError for anything unknown or malformed."""
    return CODEC.decode(data)


def buffers_to_wire(buffers: tuple[KVBuffer, ...] | list[KVBuffer]) -> tuple[WireBuffer, ...]:
    return tuple((b.base_ptr, b.page_bytes, b.num_pages, b.stride, b.device) for b in buffers)


def buffers_from_wire(wire: tuple[WireBuffer, ...]) -> tuple[KVBuffer, ...]:
    return tuple(KVBuffer(*w) for w in wire)


def compat_to_wire(compat: KVCompat) -> tuple[str, str, int, int, str]:
    return (compat.model, compat.dtype, compat.page_size, compat.num_layers, compat.kv_layout)


def metrics_to_wire(metrics: TransferMetrics | None) -> tuple:
    if metrics is None:
        return ()
    return (metrics.bytes, metrics.descriptors, metrics.batches, metrics.duration_s)


def metrics_from_wire(wire: tuple) -> TransferMetrics | None:
    return TransferMetrics(*wire) if wire else None


def update_state(msg: RoomUpdate) -> TransferState:
    return TransferState(msg.state)
