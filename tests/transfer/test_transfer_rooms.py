"""Room state machine on the in-process fake backend: races, timeouts, heartbeats, misuse.

The fake backend can hold a write at a gate, which makes "abort while the write is in flight"
deterministic; real engines are exercised in test_transfer_engines / test_transfer_failures.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import zmq

from transfer import KVBuffer, KVCompat, KVReceiver, KVSender, RoomMetadata, RoomStatus
from transfer import TransferState as S
from transfer.fake import FakeBackend
from transfer.protocol import (
    PROTOCOL_VERSION,
    Register,
    RegisterReply,
    RoomRequest,
    decode,
    encode,
)

from .harness import fast_config

COMPAT = KVCompat("tiny", "uint8", 1, 1, "mla")
META = RoomMetadata(first_token_id=3)


class Pair:
    def __init__(self, sender_backend: FakeBackend, decode: dict | None = None, **config) -> None:
        config = fast_config(
            "fake", **{"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.0, **config}
        )
        self.src = np.random.default_rng(0).integers(0, 255, (64, 32), dtype=np.uint8)
        self.dst = np.zeros((64, 32), np.uint8)
        buffers = [KVBuffer.from_array(self.src)]
        self.sender = KVSender(config, buffers, COMPAT, backend=sender_backend)
        dst_buffers = [KVBuffer.from_array(self.dst)]
        decode_config = replace(config, **(decode or {}))  # decode's own settings, if any
        self.receiver = KVReceiver(decode_config, dst_buffers, COMPAT, backend=FakeBackend())
        self.popped: dict[int, list[RoomStatus]] = {}

    def open(self, room: int, src=(1, 2, 3), dst=(10, 11, 40)) -> None:
        self.sender.open_room(room)
        self.receiver.open_room(room, self.sender.bootstrap_address, dst)
        self.src_pages, self.dst_pages = src, dst
        eventually(lambda: self.sender.status(room).state is S.WAITING_FOR_INPUT)

    def popped_from(self, side) -> list[RoomStatus]:
        out = self.popped.setdefault(id(side), [])
        out.extend(side.pop_finished())
        return out

    def finished(self, side, room: int, timeout: float = 5.0) -> RoomStatus:
        eventually(lambda: any(s.room == room for s in self.popped_from(side)), timeout)
        matches = [s for s in self.popped_from(side) if s.room == room]
        assert len(matches) == 1, f"room {room} finished {len(matches)} times"
        return matches[0]


def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
def pair(request: pytest.FixtureRequest, gate: threading.Event) -> Iterator[Pair]:
    options = dict(getattr(request, "param", {}))
    p = Pair(FakeBackend(gate=gate, fail_batches=options.pop("fail", False)), **options)
    yield p
    gate.set()
    eventually(lambda: p.sender.open_rooms() == 0 and p.receiver.open_rooms() == 0)
    p.receiver.close()
    p.sender.close()


def test_success_even_when_prefill_is_ready_before_decode_asks(pair: Pair, gate) -> None:
    gate.set()
    pair.sender.open_room(1)
    pair.sender.send(1, [5, 6], META)
    assert pair.sender.status(1).state is S.BOOTSTRAPPING
    pair.receiver.open_room(1, pair.sender.bootstrap_address, [7, 8])
    status = pair.finished(pair.receiver, 1)
    assert status.state is S.SUCCESS and status.metadata == META
    assert (pair.dst[[7, 8]] == pair.src[[5, 6]]).all()
    assert pair.finished(pair.sender, 1).state is S.SUCCESS


def test_decode_abort_racing_the_write_frees_pages_only_after_prefill_stops(pair, gate) -> None:
    pair.open(2)
    pair.sender.send(2, pair.src_pages, META)
    eventually(pair.sender.backend.writing.is_set)
    pair.receiver.abort(2, "client went away")
    assert pair.receiver.status(2).state is S.FAILED
    time.sleep(0.2)  # the write is held at the gate: decode must keep its pages
    assert pair.popped_from(pair.receiver) == [] and pair.popped_from(pair.sender) == []
    gate.set()
    status = pair.finished(pair.receiver, 2)
    assert "aborted by decode: client went away" in status.reason
    assert status.quarantine_s == 0  # prefill confirmed: the pages are safe to reuse at once
    assert pair.finished(pair.sender, 2).state is S.FAILED


def test_prefill_abort_during_the_write_waits_for_it(pair: Pair, gate) -> None:
    pair.open(3)
    pair.sender.send(3, pair.src_pages, META)
    eventually(pair.sender.backend.writing.is_set)
    pair.sender.abort(3, "engine shutting down")
    assert pair.sender.status(3).state is S.FAILED
    time.sleep(0.2)
    assert pair.popped_from(pair.sender) == [] and pair.popped_from(pair.receiver) == []
    gate.set()
    assert pair.finished(pair.sender, 3).reason == "aborted by prefill: engine shutting down"
    assert "aborted by prefill" in pair.finished(pair.receiver, 3).reason


@pytest.mark.parametrize("pair", [{"transfer_timeout_s": 0.3}], indirect=True)
def test_transfer_timeout(pair: Pair) -> None:
    pair.open(4)
    pair.sender.send(4, pair.src_pages, META)
    expected = "timed out in TRANSFERRING after 0.3s (raise transfer.transfer_timeout_s)"
    # either side's timer may fire first; the other side then reports the abort
    assert expected in pair.finished(pair.sender, 4).reason
    assert expected in pair.finished(pair.receiver, 4).reason


@pytest.mark.parametrize("pair", [{"fail": True}], indirect=True)
def test_engine_failure_fails_both_sides(pair: Pair, gate) -> None:
    gate.set()
    pair.open(5)
    pair.sender.send(5, pair.src_pages, META)
    assert "fake batch failed on purpose" in pair.finished(pair.sender, 5).reason
    assert "fake batch failed on purpose" in pair.finished(pair.receiver, 5).reason


def test_page_count_mismatch_fails_with_both_counts(pair: Pair) -> None:
    pair.open(6, src=(1, 2), dst=(3, 4, 5))
    pair.sender.send(6, pair.src_pages, META)
    reason = pair.finished(pair.sender, 6).reason
    assert reason.startswith("page count differs: prefill sends 2 pages, decode reserved 3")
    assert pair.finished(pair.receiver, 6).state is S.FAILED


def test_api_misuse_raises(pair: Pair, gate) -> None:
    with pytest.raises(ValueError, match="call open_room first"):
        pair.sender.send(99, [1], META)
    pair.sender.open_room(7)
    with pytest.raises(ValueError, match="already opened"):
        pair.sender.open_room(7)
    pair.sender.send(7, [1], META)
    with pytest.raises(ValueError, match="send called twice"):
        pair.sender.send(7, [1], META)
    pair.sender.abort(7, "done with the test")
    assert pair.finished(pair.sender, 7).state is S.FAILED


@contextlib.contextmanager
def quiet_prefill(pair: Pair, room: int, *, answer: bool = True) -> Iterator[None]:
    """A prefill bootstrap stand-in that says nothing after decode opens `room`.

    `answer`: accept the registration and take decode's request for the room (from then on it
    could be writing the pages); otherwise never answer the registration at all.
    """
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        pair.receiver.open_room(room, f"127.0.0.1:{port}", [1])
        if answer:
            identity, data = sock.recv_multipart()
            assert isinstance(decode(data), Register)
            sock.send_multipart([identity, encode(RegisterReply(""))])
            assert isinstance(decode(sock.recv_multipart()[1]), RoomRequest)
        yield
    finally:
        sock.close(linger=0)
        context.term()


def test_decode_fails_rooms_of_a_silent_prefill(pair: Pair) -> None:
    with quiet_prefill(pair, 8):
        status = pair.finished(pair.receiver, 8, timeout=5)
    assert status.state is S.FAILED and "silent" in status.reason
    # it had asked for the room, so the silent prefill may have been writing: quarantine
    assert status.quarantine_s == pair.receiver.config.quarantine_s > 0


@pytest.mark.parametrize("pair", [{"abort_timeout_s": 0.3, "quarantine_s": 7.0}], indirect=True)
def test_an_abort_prefill_never_confirms_quarantines_the_pages(pair: Pair) -> None:
    with quiet_prefill(pair, 12):
        pair.receiver.abort(12, "client went away")
        status = pair.finished(pair.receiver, 12, timeout=5)
    assert status.state is S.FAILED and "client went away" in status.reason
    assert status.quarantine_s == 7.0


def test_a_room_never_requested_needs_no_quarantine(pair: Pair) -> None:
    with quiet_prefill(pair, 13, answer=False):
        pair.receiver.abort(13, "client went away")
        status = pair.finished(pair.receiver, 13, timeout=5)
    assert status.state is S.FAILED and status.quarantine_s == 0


def test_prefill_fails_rooms_of_a_silent_decode(pair: Pair) -> None:
    context = zmq.Context()
    ghost = context.socket(zmq.DEALER)  # registers, asks for a room, then goes quiet
    ghost.setsockopt(zmq.IDENTITY, b"ghost")
    ghost.connect(f"tcp://{pair.sender.bootstrap_address}")
    try:
        buffers = ((0, 32, 64, 32, "cpu"),)
        wire_compat = ("tiny", "uint8", 1, 1, "mla")
        version = PROTOCOL_VERSION
        register = Register(
            version, "ghost", "fake", "nowhere", b"", buffers, wire_compat, 0, 256, 4
        )
        ghost.send(encode(register))
        assert decode(ghost.recv()) == RegisterReply("")
        pair.sender.open_room(9)
        ghost.send(encode(RoomRequest(9, (1,), 0)))
        status = pair.finished(pair.sender, 9, timeout=5)
        assert status.state is S.FAILED and "decode ghost at nowhere silent" in status.reason
    finally:
        ghost.close(linger=0)
        context.term()


PATIENT = {"heartbeat_timeout_s": 5.0}


@pytest.mark.parametrize(
    ("pair", "held"),
    [
        ({"decode": PATIENT}, "sender"),
        ({"heartbeat_timeout_s": 5.0, "decode": {"heartbeat_timeout_s": 1.0}}, "receiver"),
    ],
    indirect=["pair"],
)
def test_a_held_up_control_loop_drops_no_peer(pair: Pair, gate, held: str) -> None:
    """A loop held past its heartbeat timeout (a long call on it, a starved process) still
    hears the peer that kept talking, and does not count its own hold-up as the peer's
    silence. (The other side, with a longer timeout here, waits the hold-up out.)"""
    pair.open(14)
    released = threading.Event()
    side = getattr(pair, held)
    side._loop.post(lambda: (time.sleep(1.5), released.set()))  # its timeout is 1 s
    assert released.wait(5)
    time.sleep(0.3)  # a heartbeat round or two after the hold-up
    gate.set()
    pair.sender.send(14, pair.src_pages, META)
    assert pair.finished(pair.receiver, 14).state is S.SUCCESS
    assert pair.finished(pair.sender, 14).state is S.SUCCESS


def test_destination_pages_outside_the_decode_pool_are_refused(pair: Pair) -> None:
    pair.sender.open_room(10)
    pair.receiver.open_room(10, pair.sender.bootstrap_address, [1, 1000])
    expected = "destination page 1000 out of range (decode has 64 pages)"
    assert pair.finished(pair.sender, 10).reason == expected
    assert expected in pair.finished(pair.receiver, 10).reason


def test_a_room_declined_before_prefill_opens_it_ends_at_open(pair: Pair) -> None:
    """Decode's decline can reach prefill before the request does: opening the room then ends
    it at once (reported by pop_finished), instead of refusing the request."""
    pair.receiver.decline(21, pair.sender.bootstrap_address, "it prefills locally")
    deadline = time.monotonic() + 10
    while pair.sender.status(21) is None:
        assert time.monotonic() < deadline, "the decline never reached prefill"
        time.sleep(0.01)
    assert pair.sender.pop_finished() == []  # nobody opened it: nobody is told
    pair.sender.open_room(21)
    [status] = pair.sender.pop_finished()
    assert status.room == 21 and status.state is S.FAILED and "declined by decode" in status.reason
    with pytest.raises(ValueError, match="already opened"):
        pair.sender.open_room(21)  # claimed once; a second open is a real clash
