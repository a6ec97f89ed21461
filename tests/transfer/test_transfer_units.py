"""Pure units: states, descriptors, messages, compatibility, metadata slots, config."""

from __future__ import annotations

import queue
import re
import threading
import time

import numpy as np
import pytest

from transfer import KVBuffer, KVCompat, RoomMetadata, TransferConfig, TransferState
from transfer.buffers import regions_for
from transfer.compat import check_compatible
from transfer.descriptors import build_descriptors, page_runs, split_batches
from transfer.metaslots import SlotPool, decode_slot, encode_slot
from transfer.protocol import ProtocolError, RoomRequest, RoomUpdate, decode, encode
from transfer.registry import create_backend

S = TransferState


def test_states_only_move_forward() -> None:
    assert S.BOOTSTRAPPING.can_move_to(S.WAITING_FOR_INPUT)
    assert S.BOOTSTRAPPING.can_move_to(S.TRANSFERRING)
    assert S.TRANSFERRING.can_move_to(S.FAILED)
    assert not S.TRANSFERRING.can_move_to(S.WAITING_FOR_INPUT)
    assert not S.SUCCESS.can_move_to(S.FAILED)
    assert not S.FAILED.can_move_to(S.SUCCESS)


def test_runs_merge_only_when_both_sides_are_consecutive() -> None:
    runs = page_runs(np.array([7, 8, 9, 3, 4, 5]), np.array([40, 41, 42, 90, 92, 93]))
    assert runs.src_start.tolist() == [7, 3, 4]
    assert runs.dst_start.tolist() == [40, 90, 92]
    assert runs.length.tolist() == [3, 1, 2]


def test_descriptors_for_packed_and_strided_buffers() -> None:
    packed = KVBuffer(base_ptr=1000, page_bytes=10, num_pages=100)
    strided = KVBuffer(base_ptr=5000, page_bytes=10, num_pages=100, page_stride=40)
    descs = build_descriptors([packed, strided], [packed, packed], [1, 2, 3], [5, 6, 9])
    # packed: runs (1-2 -> 5-6) and (3 -> 9); strided source: one descriptor per page
    assert descs.src.tolist() == [1010, 1030, 5040, 5080, 5120]
    assert descs.dst.tolist() == [1050, 1090, 1050, 1060, 1090]
    assert descs.lengths.tolist() == [20, 10, 10, 10, 10]
    assert [len(b) for b in split_batches(descs, 2)] == [2, 2, 1]


def test_descriptors_reject_pages_out_of_range() -> None:
    buf = KVBuffer(base_ptr=0, page_bytes=8, num_pages=4)
    with pytest.raises(ValueError, match="destination page 4 out of range"):
        build_descriptors([buf], [buf], [0], [4])
    with pytest.raises(ValueError, match="page count differs"):
        build_descriptors([buf], [buf], [0, 1], [2])


def test_buffer_views_from_arrays_and_registration_regions() -> None:
    whole = np.zeros((8, 2, 16), np.uint8)  # page-major: [pages, layers, bytes]
    views = [KVBuffer.from_array(whole[:, layer]) for layer in range(2)]
    assert views[1].base_ptr == views[0].base_ptr + 16
    assert (views[0].page_bytes, views[0].stride) == (16, 32)
    regions = regions_for(views)
    assert len(regions) == 1 and regions[0].length == whole.nbytes


def test_touching_gpu_buffers_register_apart_and_cpu_ones_as_one() -> None:
    """Back-to-back buffers merge on CPU; on a GPU they may be two allocations, so stay two
    registrations (views that overlap, of one allocation, still merge)."""
    for device, count in (("cpu", 1), ("cuda:0", 2)):
        touching = [
            KVBuffer(1 << 20, 4096, 4, device=device),
            KVBuffer((1 << 20) + 16384, 4096, 4, device=device),
        ]
        assert len(regions_for(touching)) == count
    overlapping = [
        KVBuffer(1 << 20, 16, 8, 32, "cuda:0"),
        KVBuffer((1 << 20) + 16, 16, 8, 32, "cuda:0"),
    ]
    assert [(r.base_ptr, r.length) for r in regions_for(overlapping)] == [(1 << 20, 7 * 32 + 32)]


def test_messages_round_trip_and_reject_garbage() -> None:
    for msg in (RoomRequest(5, (1, 2, 3), 7), RoomUpdate(5, 3, "", (10, 2, 1, 0.5))):
        assert decode(encode(msg)) == msg
    with pytest.raises(ProtocolError):
        decode(b"\x93\xa4nope\x01\x02")
    with pytest.raises(ProtocolError):
        decode(encode(RoomRequest(1, (), 0))[:-1])


def test_compat_mismatch_names_both_values_and_the_fix() -> None:
    a = KVCompat("llama", "bfloat16", 16, 32, "mha")
    b = KVCompat("llama", "bfloat16", 64, 32, "mha")
    with pytest.raises(RuntimeError) as info:
        check_compatible(a, b, [], [])
    assert str(info.value) == "page_size differs: prefill 16, decode 64 (set cache.page_size alike)"
    buf = KVBuffer(0, 128, 4)
    with pytest.raises(RuntimeError, match="KV buffer count differs: prefill 1, decode 2"):
        check_compatible(a, a, [buf], [buf, buf])


def test_metadata_slot_round_trip_guards_room_and_size() -> None:
    meta = RoomMetadata(9, -0.1, ((9, -0.1), (4, -2.5)), cached_tokens=32)
    pool = SlotPool(num_slots=2, slot_bytes=256)
    slot = pool.acquire()
    data = encode_slot(77, meta, 256)
    pool.view(slot)[: len(data)] = data
    assert decode_slot(pool.view(slot), 77) == meta
    with pytest.raises(ValueError, match="holds room 77, expected room 78"):
        decode_slot(pool.view(slot), 78)
    huge = RoomMetadata(1, 0.0, tuple((i, 0.5) for i in range(100)))
    with pytest.raises(ValueError, match=re.escape("raise transfer.meta_slot_bytes")):
        encode_slot(1, huge, 256)
    pool.acquire()
    with pytest.raises(RuntimeError, match=re.escape("raise transfer.meta_slots")):
        pool.acquire()


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match=re.escape("waiting_timeout_s must be > 0")):
        TransferConfig(waiting_timeout_s=0)
    with pytest.raises(ValueError, match=re.escape("protocol must be tcp or rdma")):
        TransferConfig(protocol="udp")
    with pytest.raises(ValueError, match=re.escape("fault_fraction must be between 0 and 1")):
        TransferConfig(fault_fraction=1.5)
    with pytest.raises(
        ValueError, match=re.escape("set transfer.backend to one of mooncake, nccl, nixl, none")
    ):
        create_backend(TransferConfig(backend="gloo"))
    with pytest.raises(ValueError, match="no transfer engine"):
        create_backend(TransferConfig(backend="none"))


class _GatedBackend:
    """Writes to a peer in `hung` block until its gate opens (a decode that hangs)."""

    def __init__(self, hung: dict[str, threading.Event]) -> None:
        self.hung = hung
        self.lock = threading.Lock()
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def submit(self, peer_key: str, batch: object) -> str:
        with self.lock:
            self.active[peer_key] = self.active.get(peer_key, 0) + 1
            self.peak[peer_key] = max(self.peak.get(peer_key, 0), self.active[peer_key])
        return peer_key

    def wait(self, peer_key: str, deadline: float) -> str:
        gate = self.hung.get(peer_key)
        if gate is not None:
            gate.wait(30)
        with self.lock:
            self.active[peer_key] -= 1
        return ""


def test_writers_cap_each_peer_and_grow_past_a_hung_one() -> None:
    from transfer.worker import JobResult, TransferJob, TransferWorkers

    gate = threading.Event()
    backend = _GatedBackend({"hung": gate})
    done: queue.SimpleQueue[JobResult] = queue.SimpleQueue()
    workers = TransferWorkers(backend, 2, 16, 1, 256, done.put, max_threads=8)  # type: ignore[arg-type]
    workers.start()

    def job(room: int, peer: str) -> TransferJob:
        cancel = threading.Event()
        return TransferJob(room, peer, (), (), (), b"meta", 0, time.monotonic() + 60, cancel)

    try:
        for room in range(5):
            workers.submit(job(room, "hung"))  # 2 write, 3 wait for the peer's share
        deadline = time.monotonic() + 10
        while backend.active.get("hung", 0) < 2:  # both of its writers are blocked now
            assert time.monotonic() < deadline, "the hung peer's writes never started"
            time.sleep(0.001)
        for room in range(10, 13):
            workers.submit(job(room, "live"))
        live = sorted(done.get(timeout=10).room for _ in range(3))
        assert live == [10, 11, 12]  # written while the hung peer holds its writers
        assert backend.peak["hung"] == 2 and backend.peak["live"] <= 2
        assert workers.threads <= 8
        gate.set()
        hung = sorted(done.get(timeout=10).room for _ in range(5))
        assert hung == [0, 1, 2, 3, 4] and backend.peak["hung"] == 2
    finally:
        gate.set()
        workers.close()
