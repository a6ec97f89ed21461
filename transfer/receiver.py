"""The decode side: registers with prefill peers, asks for rooms, and reports their states.

Use from the decode node::

    receiver = KVReceiver(config, buffers, compat)
    receiver.open_room(room, "prefill-host:port", dst_pages)   # pages reserved by decode
    # DP attention: dst_rank=r, the pages are decode rank r's and only rank r receives them
    for status in receiver.pop_finished():                      # once per room
        if status.state is TransferState.SUCCESS:
            start_decoding(status.room, status.metadata)        # first token, logprobs, cached
        else:
            free_pages(status.room)                              # status.reason says why

A room leaves ``pop_finished`` once prefill stopped writing into its pages as far as decode can
tell: prefill said so, or prefill went silent (missed heartbeats), or it did not confirm an abort
within ``abort_timeout_s``. In the last two cases nothing confirmed it, so the status carries
``quarantine_s``: the decode node fails the request at once but reuses the pages only after that.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from .base import Endpoint, RoomStatus, TransferBackend, TransferState
from .buffers import KVBuffer, MemoryRegion, regions_for
from .compat import KVCompat
from .config import TransferConfig
from .loop import ControlLoop
from .metaslots import SlotPool, decode_slot
from .protocol import (
    PROTOCOL_VERSION,
    Heartbeat,
    HeartbeatReply,
    Message,
    ProtocolError,
    Register,
    RegisterReply,
    RoomAbort,
    RoomDecline,
    RoomRequest,
    RoomUpdate,
    UnknownPeer,
    buffers_to_wire,
    compat_to_wire,
    decode,
    encode,
    metrics_from_wire,
)
from .ranks import RankKV, owner_error
from .registry import create_backend
from .rooms import Room, RoomTable

log = logging.getLogger(__name__)


@dataclass
class PrefillPeer:
    """A prefill bootstrap server this decode talks to."""

    address: str
    socket: zmq.Socket
    registered: bool = False
    pending: list[int] = field(default_factory=list)
    declines: list[tuple[int, str]] = field(default_factory=list)
    last_seen: float = field(default_factory=time.monotonic)


class KVReceiver:
    """Decode-side transfer: registration, room requests, aborts and heartbeats."""

    def __init__(
        self,
        config: TransferConfig,
        buffers: Sequence[KVBuffer],
        compat: KVCompat,
        backend: TransferBackend | None = None,
        *,
        ranks: Sequence[RankKV] = (),
    ) -> None:
        """`ranks`: a tensor-parallel node's ranks, rank 0 (whose pool is `buffers`) first, the
        others with their engines' endpoints (each rank registers its own pool)."""
        self.config = config
        self.buffers = tuple(buffers)
        self.compat = compat
        self.decode_id = uuid.uuid4().hex
        self.backend = backend or create_backend(config)
        self._slots = SlotPool(config.meta_slots, config.meta_slot_bytes)
        slot_region = MemoryRegion(self._slots.base_ptr, len(self._slots.array))
        self.backend.register([*regions_for(self.buffers), slot_region])
        self._endpoint = self.backend.endpoint()
        self.ranks = tuple(ranks)
        if self.ranks:
            self.ranks = (
                dataclasses.replace(self.ranks[0], endpoint=self._endpoint),
                *self.ranks[1:],
            )
        self._table = RoomTable(config)
        self._peers: dict[str, PrefillPeer] = {}
        self._loop = ControlLoop("kv-receiver")
        self._loop.every(min(0.05, config.heartbeat_interval_s), self._check_deadlines)
        self._last_heartbeat = time.monotonic()
        self._loop.every(config.heartbeat_interval_s, self._heartbeat)
        self._loop.start()

    # ---- API (any thread) -------------------------------------------------------------------

    def open_room(
        self, room: int, bootstrap_address: str, dst_pages: Sequence[int], dst_rank: int = -1
    ) -> None:
        """Ask the prefill node at ``bootstrap_address`` to write ``room`` into ``dst_pages``.
        ``dst_rank`` >= 0: the room's owner (DP attention); the pages are that rank's, and only
        it receives them. -1: every rank, as the layouts' plan says."""
        pages = tuple(int(p) for p in dst_pages)
        self._loop.call(lambda: self._open(room, bootstrap_address, pages, dst_rank))

    def decline(self, room: int, bootstrap_address: str, reason: str) -> None:
        """Tell the prefill node at ``bootstrap_address`` that ``room`` will never be asked for
        (this decode prefills the request itself), so it drops the room instead of waiting."""
        self._loop.call(lambda: self._decline(room, bootstrap_address, reason))

    def abort(self, room: int, reason: str) -> None:
        """Give up on ``room``; its pages come back through ``pop_finished`` once safe."""
        self._loop.call(lambda: self._abort(room, reason))

    @property
    def endpoint(self) -> Endpoint:
        """Where prefill engines write to (sent to prefill peers at registration)."""
        return self._endpoint

    def status(self, room: int) -> RoomStatus | None:
        return self._table.status(room)

    def pop_finished(self) -> list[RoomStatus]:
        """Rooms that ended since the last call; each once. A failed room's pages may be reused
        now, or after ``status.quarantine_s`` when prefill never confirmed it stopped writing."""
        return self._table.pop_finished()

    def open_rooms(self) -> int:
        return self._table.open_count()

    def close(self) -> None:
        """Abort every room (without waiting for prefill), stop the loop, release the engine."""
        self._loop.call(self._close_rooms)
        self._loop.stop()
        self.backend.close()

    # ---- rooms (loop thread) ----------------------------------------------------------------

    def _open(self, room_id: int, address: str, pages: tuple[int, ...], dst_rank: int) -> None:
        if self._table.get(room_id) is not None or self._table.tombstone(room_id) is not None:
            raise ValueError(f"room {room_id} was already opened on this decode node")
        slot = self._slots.acquire()
        room = Room(room_id, peer=address, dst_pages=pages, meta_slot=slot, dst_rank=dst_rank)
        self._table.add(room)
        error = owner_error(self.ranks or (RankKV(0, self.buffers),), dst_rank, "decode")
        if error:  # fail here, and tell prefill not to wait for the request
            self._fail(room, error)
            return self._decline(room_id, address, error)
        peer = self._peers.get(address) or self._connect(address)
        if peer.registered:
            self._request(peer, room)
        else:
            peer.pending.append(room_id)

    def _decline(self, room_id: int, address: str, reason: str) -> None:
        peer = self._peers.get(address) or self._connect(address)
        if peer.registered:
            self._send(peer, RoomDecline(room_id, reason))
        else:
            peer.declines.append((room_id, reason))

    def _request(self, peer: PrefillPeer, room: Room) -> None:
        room.busy = True  # from here prefill may write into the pages until it says otherwise
        self._send(peer, RoomRequest(room.room, room.dst_pages, room.meta_slot, room.dst_rank))

    def _abort(self, room_id: int, reason: str) -> None:
        room = self._table.get(room_id)
        if room is not None:
            self._fail(room, f"aborted by decode: {reason}")

    def _fail(self, room: Room, reason: str) -> None:
        if self._table.fail(room, reason):
            log.info("room %d failed: %s", room.room, reason)
            if room.busy and room.peer in self._peers:
                self._send(self._peers[room.peer], RoomAbort(room.room, reason))
                room.deadline = time.monotonic() + self.config.abort_timeout_s
        self._finish(room)

    def _finish(self, room: Room) -> None:
        if room.busy or self._table.get(room.room) is not room:
            return
        self._slots.release(room.meta_slot)
        self._table.release(room)

    def _settle(self, room: Room, reason: str, *, confirmed: bool = True) -> None:
        """Prefill will not write into this room any more: fail it if live, then release.

        Unconfirmed (prefill went silent, or never confirmed an abort) while prefill may have
        been writing: the pages go into quarantine (see ``RoomStatus.quarantine_s``).
        """
        if room.busy and not confirmed:
            room.quarantine_s = self.config.quarantine_s
        room.busy = False
        self._fail(room, reason)

    def _close_rooms(self) -> None:
        for room in self._table.rooms():
            self._settle(room, "decode receiver closed")
        for peer in list(self._peers.values()):
            self._drop_peer(peer, "decode receiver closed")

    def _check_deadlines(self) -> None:
        for room in self._table.expired(time.monotonic()):
            if room.state.is_final:  # an abort prefill never confirmed
                log.warning(
                    "room %d: prefill did not confirm the abort; its pages go into quarantine "
                    "for %gs",
                    room.room,
                    self.config.quarantine_s,
                )
                self._settle(room, room.reason, confirmed=False)
            else:
                self._fail(room, self._table.timeout_reason(room))

    # ---- prefill peers (loop thread) ---------------------------------------------------------

    def _connect(self, address: str) -> PrefillPeer:
        sock = self._loop.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.decode_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{address}")
        peer = PrefillPeer(address, sock)
        self._peers[address] = peer
        self._loop.add_socket(sock, lambda s: self._on_readable(peer, s))
        self._send(peer, self._register_message())
        return peer

    def _register_message(self) -> Register:
        return Register(
            PROTOCOL_VERSION,
            self.decode_id,
            self._endpoint.backend,
            self._endpoint.session,
            self._endpoint.blob,
            buffers_to_wire(self.buffers),
            compat_to_wire(self.compat),
            self._slots.base_ptr,
            self._slots.slot_bytes,
            self._slots.num_slots,
            tuple(rank.to_wire() for rank in self.ranks),
        )

    def _drop_peer(self, peer: PrefillPeer, reason: str, *, confirmed: bool = True) -> None:
        """The peer is gone or refused us; `confirmed=False`: it went silent, so rooms it may
        have been writing go into quarantine."""
        if self._peers.get(peer.address) is not peer:
            return
        del self._peers[peer.address]
        self._loop.remove_socket(peer.socket)
        for room in self._table.rooms(peer.address):
            self._settle(room, reason, confirmed=confirmed)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        # NOTE: prefill only answers our heartbeats, so while this loop was held up (a long
        # call on it, a starved process) no answer was due: that time is not prefill's silence
        held = now - self._last_heartbeat - 2 * self.config.heartbeat_interval_s
        self._last_heartbeat = now
        for peer in list(self._peers.values()):
            if held > 0:
                peer.last_seen += held
            silent = now - peer.last_seen
            limit = self.config.heartbeat_timeout_s
            if not peer.registered:
                limit = self.config.bootstrap_timeout_s
            if silent > limit:
                what = f"prefill {peer.address} silent for {silent:.1f}s"
                self._drop_peer(peer, what, confirmed=False)
            elif peer.registered:
                self._send(peer, Heartbeat())

    def _on_readable(self, peer: PrefillPeer, sock: zmq.Socket) -> None:
        while self._peers.get(peer.address) is peer:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(data)
            except ProtocolError as e:
                log.warning("dropping control message from %s: %s", peer.address, e)
                continue
            peer.last_seen = time.monotonic()
            self._dispatch(peer, msg)

    def _dispatch(self, peer: PrefillPeer, msg: Message) -> None:
        if isinstance(msg, RoomUpdate):
            self._on_update(peer, msg)
        elif isinstance(msg, RegisterReply):
            self._on_register_reply(peer, msg)
        elif isinstance(msg, UnknownPeer):
            self._drop_peer(peer, f"prefill {peer.address} lost this decode: {msg.reason}")
        elif not isinstance(msg, HeartbeatReply):
            log.warning("unexpected %s from prefill %s", type(msg).__name__, peer.address)

    def _on_register_reply(self, peer: PrefillPeer, msg: RegisterReply) -> None:
        if msg.error:
            return self._drop_peer(peer, f"prefill {peer.address} refused this decode: {msg.error}")
        peer.registered = True
        declines, peer.declines = peer.declines, []
        for room_id, reason in declines:
            self._send(peer, RoomDecline(room_id, reason))
        pending, peer.pending = peer.pending, []
        for room_id in pending:
            room = self._table.get(room_id)
            if room is not None and not room.state.is_final:
                self._request(peer, room)

    def _on_update(self, peer: PrefillPeer, msg: RoomUpdate) -> None:
        room = self._table.get(msg.room)
        if room is None or room.peer != peer.address:
            return
        state = TransferState(msg.state)
        if not state.is_final:
            self._table.move(room, state)
            return
        room.busy = False
        if state is TransferState.SUCCESS and not room.state.is_final:
            try:
                room.metadata = decode_slot(self._slots.view(room.meta_slot), room.room)
                room.metrics = metrics_from_wire(msg.metrics)
                self._table.move(room, TransferState.SUCCESS)
            except ValueError as e:
                self._table.fail(room, f"bad metadata block: {e}")
        elif state is TransferState.FAILED:
            self._table.fail(room, f"prefill: {msg.reason}")
        self._finish(room)

    def _send(self, peer: PrefillPeer, msg: Message) -> None:
        try:
            peer.socket.send(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not send %s to prefill %s: %s", type(msg).__name__, peer.address, e)
