"""The prefill side: a bootstrap server that decode nodes register with, and the KV writer.

Use from the prefill node::

    sender = KVSender(config, buffers, compat)     # binds the bootstrap port
    sender.open_room(room)                         # BOOTSTRAPPING until decode's request lands
    ...                                            # WAITING_FOR_INPUT: run the prefill
    sender.send(room, src_pages, RoomMetadata(first_token_id=...))   # TRANSFERRING
    # DP attention: src_rank=r, the pages are prefill rank r's and only rank r writes them
    for status in sender.pop_finished():           # SUCCESS or FAILED, once per room:
        free_or_cache(status.room)                 # the source pages are ours again

A room that fails (timeout, abort from either side, dead decode, engine error) is reported to
decode only once no write of it is in flight, so decode may free its pages on that message.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

import zmq

from .base import (
    DECLINED,
    RoomMetadata,
    RoomStatus,
    TransferBackend,
    TransferError,
    TransferState,
)
from .buffers import KVBuffer, regions_for
from .compat import KVCompat
from .config import TransferConfig
from .loop import ControlLoop
from .metaslots import encode_slot
from .peers import DecodePeer, registration_errors
from .protocol import (
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
    decode,
    encode,
    metrics_to_wire,
)
from .ranks import RankKV, owner_error, owner_plan, slice_plan
from .registry import create_backend
from .rooms import Room, RoomTable
from .worker import JobResult, TransferJob, TransferWorkers, WritePart

log = logging.getLogger(__name__)


class KVSender:
    """Prefill-side transfer: bootstrap server, room states and KV writes to decode nodes."""

    def __init__(
        self,
        config: TransferConfig,
        buffers: Sequence[KVBuffer],
        compat: KVCompat,
        backend: TransferBackend | None = None,
        *,
        ranks: Sequence[RankKV] = (),
        rank_backends: Sequence[TransferBackend] = (),
    ) -> None:
        """`ranks`: a tensor-parallel node's ranks (rank 0, whose pool is `buffers`, first) and
        `rank_backends` the engines of ranks 1.. (transfer/agent.py's RemoteBackend)."""
        self.config = config
        self.buffers = tuple(buffers)
        self.compat = compat
        self.backend = backend or create_backend(config)
        self.ranks = tuple(ranks) or (RankKV(0, self.buffers),)
        self._engines = {
            0: self.backend,
            **{r.rank: b for r, b in zip(self.ranks[1:], rank_backends, strict=True)},
        }
        max_batch = config.max_batch_descriptors or self.backend.default_batch_descriptors
        self._workers = TransferWorkers(
            self.backend,
            config.num_workers,
            max_batch,
            config.max_inflight_batches,
            config.meta_slot_bytes,
            lambda result: self._loop.post(lambda: self._on_job_done(result)),
        )
        self.backend.register([*regions_for(self.buffers), self._workers.staging_region])
        self._table = RoomTable(config)
        self._peers: dict[str, DecodePeer] = {}
        # decode id -> its (engine, key) pairs, until our writes into it drain
        self._dropped_keys: dict[str, list[tuple[TransferBackend, str]]] = {}
        self._loop = ControlLoop("kv-sender")
        self._router = self._loop.context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        port = config.bootstrap_port
        if port:
            self._router.bind(f"tcp://{config.host}:{port}")
        else:
            port = self._router.bind_to_random_port(f"tcp://{config.host}")
        self.bootstrap_address = f"{config.host}:{port}"
        # transfer.fault_fraction: seeded per node, so a test run fails the same rooms again
        self._faults = random.Random(self.bootstrap_address) if config.fault_fraction else None
        self._loop.add_socket(self._router, self._on_readable)
        self._loop.every(min(0.05, config.heartbeat_interval_s), self._check_deadlines)
        self._loop.every(config.heartbeat_interval_s, self._check_peers)
        self._workers.start()
        self._loop.start()

    # ---- API (any thread) -------------------------------------------------------------------

    def open_room(self, room: int) -> None:
        """Expect decode's request for ``room`` (BOOTSTRAPPING until it arrives). A room decode
        already declined or aborted ends at once: ``pop_finished`` reports it, as any other."""
        self._loop.call(lambda: self._open(room))

    def send(
        self, room: int, src_pages: Sequence[int], metadata: RoomMetadata, src_rank: int = -1
    ) -> None:
        """The room's KV is ready in ``src_pages``: write it, then ``metadata``, to decode.
        ``src_rank`` >= 0: the room's owner (DP attention); the pages are that rank's, and only
        it writes them. -1: the ranks write as the layouts' plan says."""
        if self._faults is not None and self._faults.random() < self.config.fault_fraction:
            # NOTE: testing only; the real failure path: decode hears FAILED, pages freed once
            self.abort(room, "injected transfer fault")
            return
        pages = tuple(int(p) for p in src_pages)
        self._loop.call(lambda: self._send(room, pages, metadata, src_rank))

    def abort(self, room: int, reason: str) -> None:
        """Give up on ``room`` (also for rooms not opened yet, so a late request fails fast)."""
        self._loop.call(lambda: self._abort(room, reason))

    def status(self, room: int) -> RoomStatus | None:
        return self._table.status(room)

    def pop_finished(self) -> list[RoomStatus]:
        """Rooms that ended since the last call; each once. Their source pages are free now."""
        return self._table.pop_finished()

    def open_rooms(self) -> int:
        return self._table.open_count()

    def close(self) -> None:
        """Fail every open room, stop the threads and release the engine."""
        self._loop.call(self._fail_all)
        self._workers.close()
        self._loop.stop()
        for engine in self._engines.values():
            engine.close()

    # ---- room transitions (loop thread) ------------------------------------------------------

    def _fail_all(self) -> None:
        for room in self._table.rooms():
            self._fail(room, "prefill sender closed")

    def _open(self, room: int) -> None:
        existing = self._table.get(room)
        if existing is not None and not existing.user_owned:
            existing.user_owned = True  # decode's request arrived first
            return
        if existing is None and self._table.claim(room):
            return  # decode declined or aborted it first: pop_finished reports how it ended
        if existing is not None or self._table.tombstone(room) is not None:
            raise ValueError(f"room {room} was already opened on this prefill node")
        self._table.add(Room(room))

    def _send(
        self, room_id: int, pages: tuple[int, ...], metadata: RoomMetadata, src_rank: int
    ) -> None:
        room = self._table.get(room_id)
        if room is None:
            if self._table.tombstone(room_id) is not None:
                return  # it already ended; pop_finished reports it
            raise ValueError(f"room {room_id} is not open (call open_room first)")
        if room.src_pages is not None:
            raise ValueError(f"room {room_id}: send called twice")
        room.src_pages, room.metadata, room.src_rank = pages, metadata, src_rank
        error = owner_error(self.ranks, src_rank, "prefill")
        if error:
            return self._fail(room, error)
        if room.peer and not room.state.is_final:
            self._start(room)

    def _start(self, room: Room) -> None:
        peer = self._peers[room.peer]
        if len(room.src_pages or ()) != len(room.dst_pages):
            reason = (
                f"page count differs: prefill sends {len(room.src_pages or ())} pages, decode "
                f"reserved {len(room.dst_pages)} (both sides must page the prompt alike)"
            )
            return self._fail(room, reason)
        try:
            meta = encode_slot(room.room, room.metadata, peer.meta_slot_bytes)  # type: ignore[arg-type]
        except ValueError as e:
            return self._fail(room, str(e))
        self._table.move(room, TransferState.TRANSFERRING)
        self._reply(peer.decode_id, RoomUpdate(room.room, TransferState.TRANSFERRING))
        room.busy = True
        ours, theirs = {r.rank: r for r in self.ranks}, {r.rank: r for r in peer.ranks}
        parts = tuple(
            WritePart(self._engines[s.src], peer.keys[s.src, s.dst], s, ours[s.src], theirs[s.dst])
            for s in owner_plan(peer.plan, room.src_rank, room.dst_rank)
        )
        job = TransferJob(
            room.room,
            peer.peer_key,
            room.src_pages or (),
            room.dst_pages,
            parts,
            meta,
            peer.meta_address(room.meta_slot),
            room.deadline,
            room.cancel,
        )
        self._workers.submit(job)

    def _abort(self, room_id: int, reason: str) -> None:
        room = self._table.get(room_id)
        if room is not None:
            self._fail(room, f"aborted by prefill: {reason}")
        elif self._table.tombstone(room_id) is None:
            room = self._table.add(Room(room_id, user_owned=False))
            self._fail(room, f"aborted by prefill: {reason}")

    def _fail(self, room: Room, reason: str) -> None:
        if self._table.fail(room, reason):
            room.cancel.set()
            log.info("room %d failed: %s", room.room, reason)
        self._finish(room)

    def _finish(self, room: Room) -> None:
        """Tell decode and release, once no write of this room is in flight."""
        if room.busy or self._table.get(room.room) is not room:
            return
        if room.peer in self._peers:
            update = RoomUpdate(room.room, room.state, room.reason, metrics_to_wire(room.metrics))
            self._reply(room.peer, update)
        self._table.release(room)
        self._disconnect_if_drained(room.peer)

    def _on_job_done(self, result: JobResult) -> None:
        room = self._table.get(result.room)
        if room is None:
            return
        room.busy = False
        room.metrics = result.metrics
        if result.error and time.monotonic() >= room.deadline:
            self._table.fail(room, self._table.timeout_reason(room))
        elif result.error:
            self._table.fail(room, f"transfer failed: {result.error}")
        else:
            self._table.move(room, TransferState.SUCCESS)
        self._finish(room)

    def _check_deadlines(self) -> None:
        for room in self._table.expired(time.monotonic()):
            self._fail(room, self._table.timeout_reason(room))

    # ---- decode peers and messages (loop thread) ---------------------------------------------

    def _check_peers(self) -> None:
        now = time.monotonic()
        if any(now - p.last_seen > self.config.heartbeat_timeout_s for p in self._peers.values()):
            # NOTE: read what already arrived first: a loop that was itself held up must not
            # take the heartbeats waiting in its own socket for its peers' silence
            self._on_readable(self._router)
            now = time.monotonic()
        for peer in list(self._peers.values()):
            silent = now - peer.last_seen
            if silent > self.config.heartbeat_timeout_s:
                self._drop_peer(peer, f"{peer.label} silent for {silent:.1f}s")

    def _drop_peer(self, peer: DecodePeer, reason: str) -> None:
        log.warning("dropping decode peer: %s", reason)
        del self._peers[peer.decode_id]
        self._dropped_keys[peer.decode_id] = [
            (self._engines[src], key) for (src, _), key in peer.keys.items()
        ]
        for engine, key in self._dropped_keys[peer.decode_id]:
            engine.abandon(key)
        for room in self._table.rooms(peer.decode_id):
            self._fail(room, reason)
        self._disconnect_if_drained(peer.decode_id)

    def _disconnect_if_drained(self, decode_id: str) -> None:
        # NOTE: forget a dropped peer's engine only once none of our writes to it is in flight.
        if decode_id in self._peers or decode_id not in self._dropped_keys:
            return
        if not self._table.rooms(decode_id):
            for engine, key in self._dropped_keys.pop(decode_id):
                engine.disconnect(key)

    def _on_readable(self, sock: zmq.Socket) -> None:
        while True:
            try:
                identity, data = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue  # not [identity, payload]: not one of ours
            try:
                self._dispatch(identity.decode(), decode(data))
            except ProtocolError as e:
                log.warning("dropping control message: %s", e)

    def _dispatch(self, decode_id: str, msg: Message) -> None:
        if decode_id in self._dropped_keys:
            # NOTE: we dropped this decode but writes into its pages are still draining; stay
            # silent (no UnknownPeer, no new registration) so it cannot free those pages yet.
            return
        if isinstance(msg, Register):
            return self._on_register(decode_id, msg)
        peer = self._peers.get(decode_id)
        if peer is None:
            self._reply(decode_id, UnknownPeer("register first (prefill restarted or timed out)"))
            return
        peer.last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            self._reply(decode_id, HeartbeatReply())
        elif isinstance(msg, RoomRequest):
            self._on_room_request(peer, msg)
        elif isinstance(msg, RoomAbort):
            self._on_room_abort(peer, msg)
        elif isinstance(msg, RoomDecline):
            self._abort(msg.room, f"{DECLINED}: {msg.reason}")
        else:
            log.warning("unexpected %s from decode %s", type(msg).__name__, decode_id)

    def _on_register(self, decode_id: str, msg: Register) -> None:
        errors = registration_errors(msg, self.backend.name, self.compat, self.buffers, self.ranks)
        if not errors and decode_id in self._peers:
            self._drop_peer(
                self._peers[decode_id], f"{self._peers[decode_id].label} registered again"
            )
        peer = None
        if not errors:
            peer = DecodePeer.from_register(msg, "")
            peer.plan = tuple(slice_plan(self.ranks, peer.ranks))
            errors = self._connect_ranks(peer)
        if errors or peer is None:
            self._reply(decode_id, RegisterReply("; ".join(errors)))
            return
        peer.peer_key = peer.keys[0, 0]  # rank 0 to rank 0: the metadata's path, always connected
        self._peers[decode_id] = peer
        self._reply(decode_id, RegisterReply(""))

    def _connect_ranks(self, peer: DecodePeer) -> list[str]:
        """Connect each of our ranks to the decode ranks it writes (rank 0 also to decode's rank
        0, for the metadata); on a failure, undo and say why. Replicated pools: every pair, as a
        room may name any rank on either side as its owner (DP attention)."""
        theirs = {r.rank: r for r in peer.ranks}
        pairs = {(s.src, s.dst) for s in peer.plan} | {(0, 0)}
        if not any(r.sliced for r in (*self.ranks, *peer.ranks)):
            pairs |= {(s.rank, d.rank) for s in self.ranks for d in peer.ranks}
        for src, dst in sorted(pairs):
            endpoint = theirs[dst].endpoint
            try:
                if endpoint is None:
                    raise TransferError(f"decode rank {dst} sent no engine endpoint")
                peer.keys[src, dst] = self._engines[src].connect(endpoint)
            except Exception as e:
                for (s, _), key in peer.keys.items():
                    self._engines[s].disconnect(key)
                peer.keys.clear()
                session = endpoint.session if endpoint else "?"
                return [f"prefill rank {src} cannot reach decode rank {dst} engine {session}: {e}"]
        return []

    def _on_room_request(self, peer: DecodePeer, msg: RoomRequest) -> None:
        room = self._table.get(msg.room)
        tomb = self._table.tombstone(msg.room)
        if room is None and tomb is not None:
            reason = f"prefill already ended this room: {tomb.reason or tomb.state.name}"
            return self._reply(peer.decode_id, RoomUpdate(msg.room, TransferState.FAILED, reason))
        if room is not None and room.peer:
            reason = f"room already bound to decode {room.peer}"
            return self._reply(peer.decode_id, RoomUpdate(msg.room, TransferState.FAILED, reason))
        if room is None:
            room = self._table.add(Room(msg.room, user_owned=False))
        room.peer, room.dst_pages, room.meta_slot = peer.decode_id, msg.dst_pages, msg.meta_slot
        room.dst_rank = msg.dst_rank
        error = peer.request_error(msg.dst_pages, msg.meta_slot, msg.dst_rank)
        if error:
            return self._fail(room, error)
        self._table.move(room, TransferState.WAITING_FOR_INPUT)
        self._reply(peer.decode_id, RoomUpdate(room.room, TransferState.WAITING_FOR_INPUT))
        if room.src_pages is not None:
            self._start(room)

    def _on_room_abort(self, peer: DecodePeer, msg: RoomAbort) -> None:
        room = self._table.get(msg.room)
        if room is None or room.peer != peer.decode_id:
            state = TransferState.FAILED
            self._reply(peer.decode_id, RoomUpdate(msg.room, state, "prefill has no such room"))
            return
        self._fail(room, f"aborted by decode: {msg.reason}")

    def _reply(self, decode_id: str, msg: Message) -> None:
        try:
            self._router.send_multipart([decode_id.encode(), encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not send %s to decode %s: %s", type(msg).__name__, decode_id, e)
