"""Attention backends, picked by name and imported only when picked.

This module imports no torch, so a config can be checked against `ATTENTION_BACKENDS` without
loading any backend; the interface itself is in `base.py`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.layers.attention.base import AttentionBackend

# name -> "module:class"
ATTENTION_BACKENDS = {
    "torch": "engine.layers.attention.torch_backend:TorchAttention",
    "triton": "engine.layers.attention.triton_backend:TritonAttention",
    "flashinfer": "engine.layers.attention.flashinfer_backend:FlashInferAttention",
}


def create_backend(name: str, pool: Any, scale: float) -> AttentionBackend:
    """Instantiate the backend called `name` over `pool`."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r} (choose one of {sorted(ATTENTION_BACKENDS)})"
        )
    module, cls = ATTENTION_BACKENDS[name].split(":")
    return getattr(import_module(module), cls)(pool, scale)


__all__ = ["ATTENTION_BACKENDS", "create_backend"]
