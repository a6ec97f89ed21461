"""Which device each rank runs on: one GPU per rank of a host, counting from engine.device's
index, and a clear refusal where the host has too few GPUs (torch's GPU count stubbed: this
machine has none; what a rank does with its device is the GPU-marked tests' part)."""

from __future__ import annotations

import pytest
import torch

from engine.options import EngineOptions
from engine.parallel.check import _check_devices
from engine.parallel.worker import rank_device
from engine.runner import use_device


@pytest.mark.parametrize(
    ("options", "want"),
    [
        ({"device": "cuda", "tp_size": 4}, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
        ({"device": "cuda:2", "tp_size": 2}, ["cuda:2", "cuda:3"]),
        ({"device": "cpu", "tp_size": 2}, ["cpu", "cpu"]),
    ],
)
def test_one_gpu_per_rank_from_the_configured_index(options, want) -> None:
    opts = EngineOptions(**options)
    assert [rank_device(opts, r) for r in range(opts.tp_size)] == want


def test_a_second_host_counts_its_own_ranks_from_the_index() -> None:
    opts = EngineOptions(
        device="cuda", tp_size=4, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:5000"
    )
    assert [rank_device(opts, r) for r in (2, 3)] == ["cuda:0", "cuda:1"]


def test_too_few_gpus_from_the_index_on_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    _check_devices(EngineOptions(device="cuda:2", tp_size=2))  # cuda:2 and cuda:3: fits
    with pytest.raises(ValueError, match=r"cuda:3 to cuda:4 .* this one has 4"):
        _check_devices(EngineOptions(device="cuda:3", tp_size=2))
    with pytest.raises(ValueError, match="needs 8 GPUs per host"):
        _check_devices(EngineOptions(device="cuda", tp_size=8))


def test_only_a_device_with_an_index_is_made_current(monkeypatch) -> None:
    """torch.cuda.set_device refuses a bare `cuda` (its index check, run here for real): the
    single-GPU engine's device must not reach it."""
    made: list[int] = []

    def set_device(device) -> None:
        made.append(torch.cuda._utils._get_device_index(device))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    for device in ("cuda", "cpu", "cuda:1"):
        use_device(torch.device(device))
    assert made == [1]
