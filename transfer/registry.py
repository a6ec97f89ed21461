"""Transfer backends by name; an engine's Python package loads only when its backend is picked."""

from __future__ import annotations

import importlib

from .base import TransferBackend
from .config import TransferConfig

# name -> (module inside this package, class name)
BACKENDS: dict[str, tuple[str, str]] = {
    "mooncake": ("mooncake", "MooncakeBackend"),
    "nixl": ("nixl", "NixlBackend"),
    "nccl": ("nccl", "NcclBackend"),
    "fake": ("fake", "FakeBackend"),
}


NO_TRANSFER = "none"  # a node that only serves colocated requests (no engine is started)
TEST_ONLY = ("fake",)  # in-process only: no config may name it


def served_backends() -> list[str]:
    """The names a node's config may give transfer.backend."""
    return [*sorted(b for b in BACKENDS if b not in TEST_ONLY), NO_TRANSFER]


def check_backend(name: str) -> None:
    """Raise ValueError unless a node's config may name backend `name`."""
    if name not in served_backends():
        names = ", ".join(served_backends())
        raise ValueError(
            f"unknown transfer backend {name!r} (set transfer.backend to one of {names})"
        )


def create_backend(config: TransferConfig) -> TransferBackend:
    """Build the backend named by ``config.backend``."""
    if config.backend not in BACKENDS:
        check_backend(config.backend)  # the error names the choices
        raise ValueError("transfer.backend is none: this node has no transfer engine")
    module_name, class_name = BACKENDS[config.backend]
    module = importlib.import_module(f".{module_name}", __package__)
    return getattr(module, class_name).from_config(config)
