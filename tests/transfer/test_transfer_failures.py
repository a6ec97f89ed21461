"""Real engines, real processes: aborts, timeouts, incompatible peers and a decode that dies."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from tests.ports import free_port
from transfer import RoomMetadata, TransferState

from .conftest import Cluster
from .harness import DecodeNode, PrefillSide, fast_config

META = RoomMetadata(first_token_id=5)


def room_id() -> int:
    return random.getrandbits(62)


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def open_pair(cluster: Cluster, pages: int = 8) -> int:
    room = room_id()
    cluster.prefill.open("mha", room, pages)
    cluster.decode.open("mha", room, cluster.prefill.address("mha"), pages)
    sender = cluster.prefill.senders["mha"]
    eventually(lambda: sender.status(room).state is TransferState.WAITING_FOR_INPUT)
    return room


def test_abort_from_decode(cluster: Cluster) -> None:
    room = open_pair(cluster)
    cluster.decode.call("abort", room, "client went away")
    status, _ = cluster.decode.wait([room])[room]
    assert status.state is TransferState.FAILED
    assert "aborted by decode: client went away" in status.reason
    prefill = cluster.prefill.wait([room])[room]
    assert prefill.state is TransferState.FAILED and "aborted by decode" in prefill.reason


def test_abort_from_decode_races_the_write(cluster: Cluster) -> None:
    rooms = [open_pair(cluster, pages=1024) for _ in range(4)]
    for room in rooms:
        cluster.prefill.send(room, META)
        cluster.decode.call("abort", room, "raced")
    decode = cluster.decode.wait(rooms)
    prefill = cluster.prefill.wait(rooms)
    for room in rooms:  # decode gave up; prefill may have finished first. Pages freed once each.
        assert decode[room][0].state is TransferState.FAILED
        assert prefill[room].state in (TransferState.SUCCESS, TransferState.FAILED)


def test_abort_from_prefill(cluster: Cluster) -> None:
    room = open_pair(cluster)
    cluster.prefill.senders["mha"].abort(room, "prompt rejected")
    assert cluster.prefill.wait([room])[room].state is TransferState.FAILED
    status, _ = cluster.decode.wait([room])[room]
    assert status.state is TransferState.FAILED
    assert "aborted by prefill: prompt rejected" in status.reason


def test_abort_before_decode_arrives_fails_its_late_request(cluster: Cluster) -> None:
    room = room_id()
    cluster.prefill.senders["mha"].abort(room, "rejected at the door")
    cluster.decode.open("mha", room, cluster.prefill.address("mha"), 4)
    status, _ = cluster.decode.wait([room], timeout=5)[room]
    assert status.state is TransferState.FAILED and "rejected at the door" in status.reason


def _dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


def test_every_waiting_state_times_out(cluster: Cluster) -> None:
    never_sent, never_requested, nobody_there = room_id(), room_id(), room_id()
    cluster.decode.open("mha", never_sent, cluster.prefill.address("mha"), 4)
    cluster.prefill.open("mha", never_requested, 4)
    cluster.decode.open("mha", nobody_there, _dead_address(), 4)
    decode = cluster.decode.wait([never_sent, nobody_there], timeout=10)
    prefill = cluster.prefill.wait([never_requested], timeout=10)
    assert "timed out in WAITING_FOR_INPUT" in decode[never_sent][0].reason
    assert "raise transfer.waiting_timeout_s" in decode[never_sent][0].reason
    assert prefill[never_requested].reason == (
        "timed out in BOOTSTRAPPING after 2s (raise transfer.bootstrap_timeout_s)"
    )
    reason = decode[nobody_there][0].reason
    assert "BOOTSTRAPPING" in reason or "silent" in reason


def test_incompatible_decode_is_refused_with_both_values(cluster: Cluster) -> None:
    room = room_id()
    cluster.decode.open("mha_bad", room, cluster.prefill.address("mha"), 4)
    status, _ = cluster.decode.wait([room], timeout=5)[room]
    assert status.state is TransferState.FAILED
    assert "page_size differs: prefill 4, decode 64 (set cache.page_size alike)" in status.reason


@pytest.mark.parametrize("backend", ["mooncake", "nixl", "nccl"])
def test_decode_killed_mid_transfer(backend: str) -> None:
    # Small batches, one in flight: a 2048-page room takes long enough to be cut in half.
    config = fast_config(backend, max_batch_descriptors=16, max_inflight_batches=1)
    prefill = PrefillSide(config, 8192, layouts=("mha",))
    doomed = DecodeNode(config, 8192, ("mha",))
    alive = DecodeNode(config, 1024, ("mha",))
    try:
        address = prefill.address("mha")
        doomed_rooms = [room_id() for _ in range(3)]
        for room in doomed_rooms:
            prefill.open("mha", room, 2048)
            doomed.open("mha", room, address, 2048)
        live_room = room_id()
        expected = prefill.open("mha", live_room, 64)
        alive.open("mha", live_room, address, 64)
        sender = prefill.senders["mha"]
        eventually(lambda: all(sender.status(r).state > 0 for r in [*doomed_rooms, live_room]))
        for room in [*doomed_rooms, live_room]:
            prefill.send(room, META)
        eventually(lambda: sender.status(doomed_rooms[0]).state is TransferState.TRANSFERRING)
        doomed.kill()
        killed_at = time.monotonic()
        done = prefill.wait(doomed_rooms, timeout=config.heartbeat_timeout_s + 3)
        assert sorted(done) == sorted(doomed_rooms), "sender hung on a dead decode"
        assert time.monotonic() - killed_at < config.heartbeat_timeout_s + 3
        assert any(s.state is TransferState.FAILED for s in done.values())
        assert prefill.wait([live_room])[live_room].state is TransferState.SUCCESS
        assert alive.wait([live_room])[live_room][1] == expected
        later = room_id()  # the live peer still works after the other one died
        expected = prefill.open("mha", later, 16)
        alive.open("mha", later, address, 16)
        prefill.send(later, META)
        assert prefill.wait([later])[later].state is TransferState.SUCCESS
        assert alive.wait([later])[later][1] == expected
        assert prefill.problems() == [] and alive.call("problems") == []
    finally:
        alive.close()
        prefill.close()


MOONCAKE_HOLDS_LIVE_WRITES = pytest.mark.xfail(
    strict=False,
    reason="known defect: Mooncake's TCP transport sometimes holds other peers' writes while one "
    "peer hangs (about 1 run in 5), until its MC_TRANSFER_TIMEOUT",
)


@pytest.mark.parametrize(
    "backend", [pytest.param("mooncake", marks=MOONCAKE_HOLDS_LIVE_WRITES), "nixl", "nccl"]
)
def test_hung_decode_holds_no_writer_a_live_one_needs(backend: str) -> None:
    """A decode that hangs mid-transfer (SIGSTOP: alive, silent) fails only its own rooms: its
    writes may block writer threads until the engine gives up, but a room for another decode
    that arrives meanwhile is written at once.

    Mooncake is an expected failure (not strict, so the report shows it every run until fixed):
    its TCP transport itself sometimes holds other peers' writes while one peer hangs (about 1
    run in 5 here, with this pool's fix; every run without it), until its MC_TRANSFER_TIMEOUT.
    The pool's part is unit-tested in test_transfer_units.py."""
    config = fast_config(backend, max_batch_descriptors=16, max_inflight_batches=1)
    prefill = PrefillSide(config, 8192, layouts=("mha",))
    hung = DecodeNode(config, 8192, ("mha",))
    alive = DecodeNode(config, 1024, ("mha",))
    try:
        address = prefill.address("mha")
        sender = prefill.senders["mha"]
        warm = room_id()  # the live decode is a known peer before the other one hangs
        prefill.open("mha", warm, 4)
        alive.open("mha", warm, address, 4)
        prefill.send(warm, META)
        assert prefill.wait([warm])[warm].state is TransferState.SUCCESS
        hung_rooms = [room_id() for _ in range(2 * config.num_workers)]
        for room in hung_rooms:
            prefill.open("mha", room, 1024)
            hung.open("mha", room, address, 1024)
        eventually(lambda: all(sender.status(r).state > 0 for r in hung_rooms))
        for room in hung_rooms:
            prefill.send(room, META)
        eventually(lambda: sender.status(hung_rooms[0]).state is TransferState.TRANSFERRING)
        hung.stop()
        stopped_at = time.monotonic()
        live_room = room_id()
        expected = prefill.open("mha", live_room, 16)
        alive.open("mha", live_room, address, 16)
        prefill.send(live_room, META)
        # well inside the room's transfer timeout, and Mooncake's own 30 s batch timeout
        assert prefill.wait([live_room], timeout=8)[live_room].state is TransferState.SUCCESS
        assert alive.wait([live_room])[live_room][1] == expected
        done = prefill.wait(hung_rooms, timeout=config.transfer_timeout_s + 10)
        # NOTE: every hung room ends, none hangs the sender. How depends on the transport: a
        # write can land in a stopped process (UCX may write through the kernel, as with CMA,
        # and a write may finish before SIGSTOP takes hold), so SUCCESS is as good as FAILED
        assert set(done) == set(hung_rooms), "a hung decode's room never ended"
        assert all(s.state.is_final for s in done.values())
        if backend == "nccl":  # dropping the decode breaks its pair: no write waits it out
            assert time.monotonic() - stopped_at < config.heartbeat_timeout_s + 3
    finally:
        hung.kill()
        alive.close()
        prefill.close()
