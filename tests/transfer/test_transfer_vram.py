"""NIXL moves bytes between buffers of the KV pool's device: DRAM on CPU, and on a GPU the
VRAM itself (registered as NIXL VRAM segments, written GPU to GPU), the same code path."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

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
