"""Attention backends, picked by name and imported only when picked."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from engine.layers.attention.base import AttentionBackend, AttentionBatch

BACKENDS = {
    "torch": "engine.layers.attention.torch_backend:TorchAttention",
}


def create_backend(name: str, pool: Any, scale: float) -> AttentionBackend:
    """Instantiate the backend called `name` over `pool`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (choose one of {sorted(BACKENDS)})")
    module, cls = BACKENDS[name].split(":")
    return getattr(import_module(module), cls)(pool, scale)


__all__ = ["BACKENDS", "AttentionBackend", "AttentionBatch", "create_backend"]
