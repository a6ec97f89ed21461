"""Transfer backends by name; an engine's Python package loads only when its backend is picked."""

from __future__ import annotations

import importlib

from .base import TransferBackend
from .config import TransferConfig

# name -> (module inside this package, class name)
BACKENDS: dict[str, tuple[str, str]] = {
    "mooncake": ("mooncake", "MooncakeBackend"),
    "nixl": ("nixl", "NixlBackend"),
    "fake": ("fake", "FakeBackend"),
}


def create_backend(config: TransferConfig) -> TransferBackend:
    """Build the backend named by ``config.backend``."""
    if config.backend not in BACKENDS:
        raise ValueError(
            f"unknown transfer backend {config.backend!r} "
            f"(set transfer.backend to one of {', '.join(sorted(BACKENDS))})"
        )
    module_name, class_name = BACKENDS[config.backend]
    module = importlib.import_module(f".{module_name}", __package__)
    return getattr(module, class_name).from_config(config)
