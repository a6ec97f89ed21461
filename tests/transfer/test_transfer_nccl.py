"""The nccl engine on its own: both ends in this process over gloo on loopback (a restart test
uses real decode processes). Ranges of every size land exactly, memory outside what an end
registered is refused, and pairs come and go (deadlines, disconnects, closes, a decode that
restarts) without a leaked thread or a wedged writer."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from transfer import MemoryRegion, RoomMetadata, TransferError, TransferState
from transfer.base import Endpoint
from transfer.descriptors import DescriptorBatch
from transfer.nccl import NcclBackend
from transfer.nccl_link import CODEC, DecodeAddress, PairWelcome, recv_frame, send_frame
from transfer.nccl_pair import PrefillPair

from .harness import DecodeNode, PrefillSide, fast_config

MiB = 1 << 20


@dataclass
class Ends:
    prefill: NcclBackend
    decode: NcclBackend
    key: str
    src: list[np.ndarray]
    dst: list[np.ndarray]

    def batch(self, src: list[tuple[int, int]], dst: list[tuple[int, int]], lengths: list[int]):
        """Ranges given as (array index, offset) on each side."""
        return DescriptorBatch(
            np.array([self.src[a].ctypes.data + o for a, o in src], np.uint64),
            np.array([self.dst[a].ctypes.data + o for a, o in dst], np.uint64),
            np.array(lengths, np.uint64),
        )

    def write(self, batch: DescriptorBatch, timeout_s: float = 10.0) -> str:
        handle = self.prefill.submit(self.key, batch)
        return self.prefill.wait(handle, time.monotonic() + timeout_s)


def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def ends() -> Iterator[Ends]:
    rng = np.random.default_rng(0)
    src = [rng.integers(0, 256, 24 * MiB, dtype=np.uint8) for _ in range(2)]
    dst = [np.zeros(24 * MiB, np.uint8) for _ in range(2)]
    prefill = NcclBackend(timeout_s=5.0, connect_timeout_s=2.0)
    decode = NcclBackend(timeout_s=5.0, connect_timeout_s=2.0)
    prefill.register([MemoryRegion(a.ctypes.data, a.nbytes) for a in src])
    decode.register([MemoryRegion(a.ctypes.data, a.nbytes) for a in dst])
    key = prefill.connect(decode.endpoint())
    yield Ends(prefill, decode, key, src, dst)
    prefill.close()
    decode.close()


def test_ranges_of_every_size_land_exactly(ends: Ends) -> None:
    # staged (short) and direct (>= 64 KiB) ranges, both regions on each side, shuffled
    rng = random.Random(1)
    lengths = [1, 7, 256, 4096, 40_000, 70_000, 300_000, 3 * MiB] * 8
    rng.shuffle(lengths)
    spans = {0: 0, 1: 0}
    src, dst = [], []
    for length in lengths:
        a = rng.randrange(2)
        src.append((a, spans[a]))
        spans[a] += length + 13
    rng.shuffle(src)
    spans = {0: 0, 1: 0}
    for length in lengths:
        a = rng.randrange(2)
        dst.append((a, spans[a]))
        spans[a] += length + 5
    assert max(spans.values()) < 24 * MiB
    assert ends.write(ends.batch(src, dst, lengths)) == ""
    for (sa, so), (da, do), n in zip(src, dst, lengths, strict=True):
        assert np.array_equal(ends.src[sa][so : so + n], ends.dst[da][do : do + n])


def test_a_destination_outside_registered_memory_is_refused(ends: Ends) -> None:
    outside = np.zeros(4096, np.uint8)
    batch = DescriptorBatch(
        np.array([ends.src[0].ctypes.data, ends.src[0].ctypes.data], np.uint64),
        np.array([ends.dst[0].ctypes.data, outside.ctypes.data], np.uint64),
        np.array([64, 64], np.uint64),
    )
    error = ends.write(batch)
    assert "decode refused batch" in error and "outside the 2 registered memory regions" in error
    assert not outside.any() and not ends.dst[0][:64].any(), "a refused batch wrote nothing"
    # a range that runs past the end of a region is refused too; the pair goes on serving
    assert "outside" in ends.write(ends.batch([(0, 0)], [(1, 24 * MiB - 10)], [11]))
    assert ends.write(ends.batch([(0, 0)], [(1, 0)], [4096])) == ""
    assert np.array_equal(ends.dst[1][:4096], ends.src[0][:4096])
    assert ends.decode.served_pairs == 1


def test_a_source_outside_registered_memory_is_refused_at_submit(ends: Ends) -> None:
    outside = np.ones(64, np.uint8)
    batch = DescriptorBatch.single(outside.ctypes.data, ends.dst[0].ctypes.data, 64)
    with pytest.raises(TransferError, match="outside the 2 registered memory regions"):
        ends.prefill.submit(ends.key, batch)


def test_a_missed_deadline_breaks_the_pair_and_the_next_write_opens_a_fresh_one(
    ends: Ends,
) -> None:
    big = ends.batch([(0, 0)], [(0, 0)], [20 * MiB])
    assert ends.write(big, timeout_s=-1.0) == "nccl batch timed out"
    # decode's thread sees the pair go at once, or, when the write was cut mid-message (gloo
    # wakes no waiter then), at its own deadline (timeout_s, 5 s here)
    eventually(lambda: ends.decode.served_pairs == 0, timeout=10.0)
    assert ends.write(big) == ""
    assert np.array_equal(ends.dst[0][: 20 * MiB], ends.src[0][: 20 * MiB])
    assert ends.decode.served_pairs == 1


def test_disconnect_ends_the_decode_side_of_the_pair(ends: Ends) -> None:
    assert ends.write(ends.batch([(0, 0)], [(0, 0)], [100])) == ""
    assert ends.decode.served_pairs == 1
    ends.prefill.disconnect(ends.key)
    eventually(lambda: ends.decode.served_pairs == 0)
    with pytest.raises(TransferError, match="unknown peer"):
        ends.prefill.submit(ends.key, ends.batch([(0, 0)], [(0, 0)], [100]))


def test_closing_decode_mid_transfer_hangs_neither_end(ends: Ends) -> None:
    handle = ends.prefill.submit(ends.key, ends.batch([(0, 0)], [(0, 0)], [20 * MiB]))
    start = time.monotonic()
    ends.decode.close()
    error = ends.prefill.wait(handle, time.monotonic() + 10)
    assert time.monotonic() - start < 3.0
    assert error == "" or "decode" in error  # it may have finished first
    with pytest.raises(TransferError, match="cannot reach decode"):
        ends.prefill.submit(ends.key, ends.batch([(0, 0)], [(0, 0)], [100]))


class MuteDecode:
    """A decode that welcomes a pair, after ``delay_s``, and then never builds its group: as
    one that dies or stops mid-rendezvous looks to prefill."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.welcomed = threading.Event()
        self._delay_s = delay_s
        self._conns: list[socket.socket] = []
        self.src: np.ndarray | None = None  # the prefill side's source memory (see _mute_pair)
        threading.Thread(target=self._serve, daemon=True).start()

    def endpoint(self) -> Endpoint:
        address = DecodeAddress(*self.listener.getsockname()[:2])
        return Endpoint("nccl", "mute", CODEC.encode(address), "cpu")

    def close(self) -> None:
        self.listener.close()
        for conn in self._conns:
            conn.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)  # held open, as a stopped process holds it
            recv_frame(conn)
            time.sleep(self._delay_s)
            send_frame(conn, PairWelcome(""))
            self.welcomed.set()


def _mute_pair(connect_timeout_s: float, delay_s: float = 0.0):
    """(prefill engine, mute decode, peer key, a batch) with the batch's source memory kept
    alive on the decode object for as long as the test holds it."""
    src = np.zeros(MiB, np.uint8)
    prefill = NcclBackend(timeout_s=5.0, connect_timeout_s=connect_timeout_s)
    prefill.register([MemoryRegion(src.ctypes.data, src.nbytes)])
    decode = MuteDecode(delay_s)
    decode.src = src
    key = prefill.connect(decode.endpoint())
    batch = DescriptorBatch.single(src.ctypes.data, 0, 100)
    return prefill, decode, key, batch


def test_abandoning_a_decode_wakes_the_writers_waiting_for_its_rendezvous() -> None:
    """A decode dropped mid-rendezvous fails the writes waiting for its pair at once, not when
    the rendezvous gives up (30 s here; gloo's connect to a dead peer takes 10 s whatever the
    timeout): the rooms they write are freed when the sender drops the decode."""
    prefill, decode, key, batch = _mute_pair(connect_timeout_s=30.0)
    errors: list[str] = []

    def write() -> None:
        try:
            prefill.submit(key, batch)
        except TransferError as e:
            errors.append(str(e))

    writers = [threading.Thread(target=write, daemon=True) for _ in range(3)]
    try:
        for w in writers:
            w.start()
        assert decode.welcomed.wait(10)
        prefill.abandon(key)
        for w in writers:
            w.join(5)
        assert not any(w.is_alive() for w in writers), "a writer still waits for the pair"
        assert len(errors) == 3 and all("decode dropped" in e for e in errors), errors
        assert len(decode._conns) == 1, "one rendezvous, shared by the writers"
        # a writer that comes after the drop hears the same reason (one that lost the race to
        # the rendezvous above did too)
        with pytest.raises(TransferError, match="decode dropped"):
            prefill.submit(key, batch)
    finally:
        prefill.close()
        decode.close()


def test_a_rendezvous_slower_than_the_connect_timeout_fails_the_write() -> None:
    # each step of the rendezvous alone stays under the timeout (the welcome after 0.8 s,
    # then the group's wait for decode's address, 1 s); the writer waits 1 s in all
    prefill, decode, key, batch = _mute_pair(connect_timeout_s=1.0, delay_s=0.8)
    try:
        with pytest.raises(TransferError, match=r"no pair with decode .* within 1s"):
            prefill.submit(key, batch)
    finally:
        prefill.close()
        decode.close()


def test_an_unexpected_error_opening_a_pair_fails_that_write_and_the_next_retries(
    ends: Ends, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise ValueError("no such device")

    monkeypatch.setattr(PrefillPair, "open", broken)
    with pytest.raises(TransferError, match=r"cannot open a pair .*no such device"):
        ends.prefill.submit(ends.key, ends.batch([(0, 0)], [(0, 0)], [100]))
    monkeypatch.undo()
    assert ends.write(ends.batch([(0, 0)], [(0, 0)], [100])) == ""
    assert np.array_equal(ends.dst[0][:100], ends.src[0][:100])


def test_a_restarted_decode_is_written_through_its_new_pair() -> None:
    config = fast_config("nccl")
    prefill = PrefillSide(config, 1024, layouts=("mha",))
    address = prefill.address("mha")
    first = DecodeNode(config, 1024, ("mha",))
    try:
        room = random.getrandbits(62)
        prefill.open("mha", room, 8)
        first.open("mha", room, address, 8)
        prefill.send(room, RoomMetadata(first_token_id=1))
        assert prefill.wait([room])[room].state is TransferState.SUCCESS
        first.kill()
        second = DecodeNode(config, 1024, ("mha",))
        try:
            room = random.getrandbits(62)
            expected = prefill.open("mha", room, 8)
            second.open("mha", room, address, 8)
            prefill.send(room, RoomMetadata(first_token_id=2))
            assert prefill.wait([room])[room].state is TransferState.SUCCESS
            assert second.wait([room])[room][1] == expected
            assert prefill.problems() == [] and second.call("problems") == []
        finally:
            second.close()
    finally:
        prefill.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_through_a_gloo_pair() -> None:
    """KV on CUDA at one end only: the pair is gloo, the bytes staged through CPU."""
    src = torch.randint(0, 256, (8 * MiB,), dtype=torch.uint8, device="cuda")
    dst = np.zeros(8 * MiB, np.uint8)
    prefill, decode = NcclBackend(), NcclBackend()
    prefill.register([MemoryRegion(src.data_ptr(), src.numel(), str(src.device))])
    decode.register([MemoryRegion(dst.ctypes.data, dst.nbytes)])
    try:
        key = prefill.connect(decode.endpoint())
        lengths = np.array([4096, 1 * MiB, 100], np.uint64)
        offsets = np.array([0, 8192, 4 * MiB], np.uint64)
        batch = DescriptorBatch(src.data_ptr() + offsets, dst.ctypes.data + offsets, lengths)
        assert prefill.wait(prefill.submit(key, batch), time.monotonic() + 10) == ""
        assert np.array_equal(dst, np.where(_covered(offsets, lengths), src.cpu().numpy(), 0))
    finally:
        prefill.close()
        decode.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_both_ends_on_one_gpu_pair_over_gloo() -> None:
    """Prefill and decode KV on the same GPU (one-GPU PD): NCCL refuses a communicator whose
    ranks share a GPU, so the pair is gloo, staged through CPU, and the bytes still land."""
    src = torch.randint(0, 256, (8 * MiB,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros(8 * MiB, dtype=torch.uint8, device="cuda")
    prefill, decode = NcclBackend(), NcclBackend()
    prefill.register([MemoryRegion(src.data_ptr(), src.numel(), str(src.device))])
    decode.register([MemoryRegion(dst.data_ptr(), dst.numel(), str(dst.device))])
    try:
        key = prefill.connect(decode.endpoint())
        lengths = np.array([4096, 1 * MiB, 100], np.uint64)
        offsets = np.array([0, 8192, 4 * MiB], np.uint64)
        batch = DescriptorBatch(src.data_ptr() + offsets, dst.data_ptr() + offsets, lengths)
        assert prefill.wait(prefill.submit(key, batch), time.monotonic() + 30) == ""
        want = np.where(_covered(offsets, lengths), src.cpu().numpy(), 0)
        assert np.array_equal(dst.cpu().numpy(), want)
    finally:
        prefill.close()
        decode.close()


def test_a_pair_on_one_gpu_is_gloo_and_on_two_nccl() -> None:
    from transfer.nccl_link import gpu_identity, group_kind

    assert group_kind("cuda:0", "cuda:1") == "nccl"
    assert group_kind("cuda:0", "cuda:0", same_gpu=True) == "gloo"
    assert group_kind("cpu", "cuda:0") == group_kind("cuda:0", "cpu") == "gloo"
    assert gpu_identity("cpu") == ""
    address = DecodeAddress("10.0.0.1", 4000, "GPU-1234")
    assert CODEC.decode(CODEC.encode(address)) == address


def _covered(offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    mask = np.zeros(8 * MiB, bool)
    for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
        mask[o : o + n] = True
    return mask


def test_nccl_pair_groups_fail_their_works_instead_of_ending_the_process(monkeypatch) -> None:
    """A pair's NCCL group is made with TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (torch reads it as
    the group is made): a peer dying mid-transfer aborts that communicator and fails its works,
    where torch's default (3) has the watchdog end the whole node. The variable is as it was
    after, so other groups (tensor parallel) keep the default."""
    from transfer import nccl_link

    seen: list[str | None] = []

    class Group:  # stands in for ProcessGroupNCCL, which a CPU build of torch lacks
        Options = type("Options", (), {})

        def __init__(self, store, rank, size, options) -> None:
            seen.append(os.environ.get(nccl_link.ASYNC_ERROR_HANDLING))

    monkeypatch.setattr(nccl_link.dist, "ProcessGroupNCCL", Group, raising=False)
    monkeypatch.delenv(nccl_link.ASYNC_ERROR_HANDLING, raising=False)
    nccl_link.build_group("nccl", None, 0, "127.0.0.1", 5.0, 5.0)
    monkeypatch.setenv(nccl_link.ASYNC_ERROR_HANDLING, "1")
    nccl_link.build_group("nccl", None, 1, "127.0.0.1", 5.0, 5.0)
    assert seen == ["2", "2"]
    assert os.environ[nccl_link.ASYNC_ERROR_HANDLING] == "1"
