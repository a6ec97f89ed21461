"""NIXL moves bytes between buffers of the KV pool's device: DRAM on CPU, and on a GPU the
VRAM itself (registered as NIXL VRAM segments, written GPU to GPU), the same code path."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from transfer.base import TransferError
from transfer.buffers import MemoryRegion
from transfer.descriptors import DescriptorBatch
from transfer.nixl import NIXL_MODULES, NixlBackend, _mem_type

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not any(importlib.util.find_spec(m) for m in NIXL_MODULES), reason="needs NIXL"
)


def test_memory_types_follow_the_device() -> None:
    assert _mem_type("cpu") == ("DRAM", 0)
    assert _mem_type("cuda") == ("VRAM", 0)
    assert _mem_type("cuda:3") == ("VRAM", 3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_scattered_ranges_land_in_the_peer_buffer(device: str) -> None:
    """Two agents, each registering one 8 MiB buffer of `device`: three ranges written into
    the other land there byte for byte, and nothing else of it changes."""
    src = torch.randint(0, 256, (8 * MiB,), dtype=torch.uint8, device=device)
    dst = torch.zeros(8 * MiB, dtype=torch.uint8, device=device)
    prefill, decode = NixlBackend(), NixlBackend()
    try:
        prefill.register([MemoryRegion(src.data_ptr(), src.numel(), str(src.device))])
        decode.register([MemoryRegion(dst.data_ptr(), dst.numel(), str(dst.device))])
        key = prefill.connect(decode.endpoint())
        offsets = np.array([0, 8192, 4 * MiB], np.uint64)
        lengths = np.array([4096, 1 * MiB, 100], np.uint64)
        batch = DescriptorBatch(src.data_ptr() + offsets, dst.data_ptr() + offsets, lengths)
        assert prefill.wait(prefill.submit(key, batch), time.monotonic() + 30) == ""
        if device == "cuda":
            torch.cuda.synchronize()
        covered = torch.zeros(8 * MiB, dtype=torch.bool)
        for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
            covered[o : o + n] = True
        want = torch.where(covered, src.cpu(), 0)
        assert torch.equal(dst.cpu(), want)
    finally:
        prefill.close()
        decode.close()


def _pair(device: str, label: str | None = None):
    """Two agents registering what a node does: KV pages on `device` (each side's spans naming
    them `label` when given: how a GPU's pages look to NIXL), then a metadata slot on CPU."""
    sides = []
    for _ in range(2):
        pages = torch.randint(0, 256, (4 * MiB,), dtype=torch.uint8, device=device)
        slot = torch.randint(0, 256, (4096,), dtype=torch.uint8)
        backend = NixlBackend()
        backend.register(
            [
                MemoryRegion(pages.data_ptr(), pages.numel(), str(pages.device)),
                MemoryRegion(slot.data_ptr(), slot.numel()),
            ]
        )
        if label is not None:
            start, end, _ = backend._spans[0]
            backend._spans[0] = (start, end, label)
        sides.append((backend, pages, slot))
    return sides


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_pages_and_metadata_each_move_in_their_own_memory(device: str) -> None:
    """A node's two kinds of writes through one agent pair: KV pages (on the pool's device) and
    the metadata slot (on CPU), each batch described with its own memory's type."""
    (prefill, src_pages, src_slot), (decode, dst_pages, dst_slot) = _pair(device)
    try:
        key = prefill.connect(decode.endpoint())
        assert decode.endpoint().device == str(dst_pages.device)
        for src, dst, n in ((src_pages, dst_pages, 1 * MiB), (src_slot, dst_slot, 64)):
            batch = DescriptorBatch.single(src.data_ptr(), dst.data_ptr() + 16, n)
            assert prefill.wait(prefill.submit(key, batch), time.monotonic() + 30) == ""
            if device == "cuda":
                torch.cuda.synchronize()
            assert torch.equal(dst[16 : 16 + n].cpu(), src[:n].cpu())
    finally:
        prefill.close()
        decode.close()


def test_each_batch_names_the_memory_type_of_its_own_regions(monkeypatch) -> None:
    """Pages registered as a GPU's (labelled cuda:0 here, on CPU) and a CPU slot: the page batch
    asks NIXL for VRAM of device 0 on both sides, the slot batch for DRAM (one type per agent,
    the last registered, sent every GPU page as DRAM: NIXL finds no such registration)."""
    (prefill, src_pages, src_slot), (decode, dst_pages, dst_slot) = _pair("cpu", "cuda:0")
    asked: list[tuple[str, int]] = []
    real = prefill._agent.get_xfer_descs

    def spy(descs, mem):
        asked.append((mem, int(descs[0][2])))
        return real(descs, "DRAM")  # the memory is really the CPU's

    monkeypatch.setattr(prefill._agent, "get_xfer_descs", spy)
    try:
        key = prefill.connect(decode.endpoint())
        assert decode.endpoint().device == "cuda:0"
        for src, dst in ((src_pages, dst_pages), (src_slot, dst_slot)):
            batch = DescriptorBatch.single(src.data_ptr(), dst.data_ptr(), 64)
            assert prefill.wait(prefill.submit(key, batch), time.monotonic() + 30) == ""
        assert asked == [("VRAM", 0), ("VRAM", 0), ("DRAM", 0), ("DRAM", 0)]
        outside = DescriptorBatch.single(src_slot.data_ptr() + 8192, dst_slot.data_ptr(), 8)
        with pytest.raises(TransferError, match="no region"):
            prefill.submit(key, outside)
    finally:
        prefill.close()
        decode.close()
