"""What an engine checks and sets in its process before it loads anything: the device torch
must be able to use, and how much compiled-kernel cache oneDNN may keep."""

from __future__ import annotations

import os

import torch


def limit_onednn_caches(entries: int) -> None:
    """Bound oneDNN's and ideep's caches of compiled matmul kernels at `entries` each (0: their
    defaults). Each distinct matmul shape compiles one kernel; a prefill node's batches come in
    ever-new token counts, so with the default limits (1024) its RSS grew by about 1 GB before
    the caches filled. Rebuilding an evicted kernel costs little next to a prefill step.

    NOTE: process-wide: both libraries read these variables when they first build a kernel, and a
    variable the user set wins.
    """
    if entries > 0:
        for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
            os.environ.setdefault(name, str(entries))


def check_device(device: str) -> None:
    """A CUDA device that torch cannot use is refused before anything loads."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        why = "it was built without CUDA" if torch.version.cuda is None else "it finds no GPU"
        raise ValueError(
            f"engine.device is {device!r} but torch {torch.__version__} cannot use CUDA ({why}): "
            "set engine.device: cpu, or install a CUDA build of torch on a GPU machine"
        )
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(
            f"engine.device is {device!r} but this machine has {torch.cuda.device_count()} "
            "GPU(s) (use cuda:0 .. cuda:N-1)"
        )
