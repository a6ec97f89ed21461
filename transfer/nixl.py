"""NIXL backend: a NIXL agent with the UCX backend; DRAM buffers on CPU, VRAM on GPU.

A peer is a remote agent loaded from the metadata blob it sent at registration (which already
describes its registered memory), so no NIXL listener thread or metadata server is needed.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .base import Endpoint, TransferBackend, TransferError
from .buffers import MemoryRegion
from .config import TransferConfig
from .descriptors import DescriptorBatch

log = logging.getLogger(__name__)


NIXL_MODULES = ("nixl", "nixl_cu12", "nixl_cu13")
"""Where NIXL's Python API lives: the `nixl` meta package, or a CUDA build's wheel by itself
(each installs under its own name)."""


def _import_nixl() -> Any:
    for module in NIXL_MODULES:
        with contextlib.suppress(ImportError):
            return importlib.import_module(f"{module}._api")
    raise TransferError(
        "transfer.backend=nixl needs NIXL (pip install nixl, or nixl-cu12 / nixl-cu13 --no-deps)"
    )


def _skip_ib_without_devices() -> None:
    # NOTE: on a machine with no RDMA device, UCX's IB modules are useless, and loading them
    # makes the process crash at exit (the wheel's bundled libnl meets the system one in
    # libibverbs). An explicit UCX_MODULES wins.
    if not glob.glob("/sys/class/infiniband/*"):
        os.environ.setdefault("UCX_MODULES", "^ib")


@contextlib.contextmanager
def _progress_delay(api: Any, delay_us: int) -> Iterator[int]:
    """While an agent is made in this block, its progress thread sleeps on the UCX workers'
    events (waking at least every `delay_us`) instead of polling without pause. Yields the
    delay the agent gets (0: NIXL's busy polling).

    NOTE: NIXL's C++ agent takes the delay (`pthrDelay`), but its Python agent sets it to 0 on
    the config it makes, and a progress thread at 0 spins a core in every process, idle or
    not. The Python agent makes that config from `nixlBind.nixlAgentConfig`, so for this block
    that name is a subclass whose `pthrDelay` keeps at least `delay_us`. Where a NIXL release
    makes its config otherwise, the agent keeps NIXL's default and the caller logs it."""
    bind = getattr(api, "nixlBind", None)
    base = getattr(bind, "nixlAgentConfig", None)
    field = getattr(base, "pthrDelay", None)
    if delay_us <= 0 or not isinstance(field, property):
        yield 0
        return

    def keep_delay(config: Any, value: int) -> None:
        field.__set__(config, max(int(value), delay_us))

    config_class = type(base.__name__, (base,), {"pthrDelay": property(field.__get__, keep_delay)})
    bind.nixlAgentConfig = config_class
    try:
        yield delay_us
    finally:
        bind.nixlAgentConfig = base


def _mem_type(device: str) -> tuple[str, int]:
    if device == "cpu":
        return "DRAM", 0
    return "VRAM", int(device.partition(":")[2] or 0)


def _descs(addrs: np.ndarray, lengths: np.ndarray, device_id: int) -> np.ndarray:
    return np.stack([addrs, lengths, np.full(len(addrs), device_id, dtype=np.uint64)], axis=1)


class NixlBackend(TransferBackend):
    """Writes each batch as one NIXL transfer request and polls it to completion."""

    name = "nixl"
    default_batch_descriptors = 4096

    def __init__(
        self, num_threads: int = 0, progress_delay_us: int = TransferConfig.nixl_progress_delay_us
    ) -> None:
        api = _import_nixl()
        _skip_ib_without_devices()
        config = api.nixl_agent_config(
            backends=["UCX"],
            sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
            num_threads=num_threads,
        )
        with _progress_delay(api, progress_delay_us) as delay:
            self._agent = api.nixl_agent(f"pdserve-{uuid.uuid4().hex}", config)
        self.progress_delay_us = delay
        if progress_delay_us and not delay:
            log.warning(
                "this NIXL makes its agent config in a way pdserve does not know: its progress "
                "thread polls without pause and keeps a core busy (nixl_progress_delay_us "
                "cannot apply)"
            )
        self._registered: list[Any] = []
        self._device = "cpu"
        self._remote_devices: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: TransferConfig) -> NixlBackend:
        return cls(config.nixl_threads, config.nixl_progress_delay_us)

    def register(self, regions: Sequence[MemoryRegion]) -> None:
        for region in regions:
            mem, dev = _mem_type(region.device)
            self._device = region.device
            reg = self._agent.register_memory([(region.base_ptr, region.length, dev, "")], mem)
            if reg is None:
                raise TransferError(f"NIXL could not register {region.length} bytes ({mem})")
            self._registered.append(reg)

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self._agent.name, self._agent.get_agent_metadata(), self._device)

    def connect(self, peer: Endpoint) -> str:
        if peer.session in self._remote_devices:
            self.disconnect(peer.session)
        name = self._agent.add_remote_agent(peer.blob)
        key = name.decode() if isinstance(name, bytes) else name
        self._remote_devices[key] = peer.device
        return key

    def disconnect(self, peer_key: str) -> None:
        if self._remote_devices.pop(peer_key, None) is not None:
            with contextlib.suppress(Exception):  # already gone; nothing to undo
                self._agent.remove_remote_agent(peer_key)

    def submit(self, peer_key: str, batch: DescriptorBatch) -> Any:
        local_mem, local_dev = _mem_type(self._device)
        remote_mem, remote_dev = _mem_type(self._remote_devices.get(peer_key, "cpu"))
        try:
            local = self._agent.get_xfer_descs(
                _descs(batch.src, batch.lengths, local_dev), local_mem
            )
            remote = self._agent.get_xfer_descs(
                _descs(batch.dst, batch.lengths, remote_dev), remote_mem
            )
            handle = self._agent.initialize_xfer("WRITE", local, remote, peer_key)
            state = self._agent.transfer(handle)
        except Exception as e:
            raise TransferError(f"NIXL refused a batch of {len(batch)} to {peer_key}: {e}") from e
        if state == "ERR":
            self._agent.release_xfer_handle(handle)
            raise TransferError(f"NIXL failed to post a batch of {len(batch)} to {peer_key}")
        return handle

    def wait(self, handle: Any, deadline: float) -> str:
        pause = 20e-6
        try:
            while (state := self._agent.check_xfer_state(handle)) == "PROC":
                if time.monotonic() > deadline:
                    return "NIXL batch timed out"
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
            return "" if state == "DONE" else "NIXL batch failed"
        except Exception as e:
            return f"NIXL batch failed: {e}"
        finally:
            self._release(handle)

    def close(self) -> None:
        for peer in list(self._remote_devices):
            self.disconnect(peer)
        for reg in self._registered:
            self._agent.deregister_memory(reg)
        self._registered.clear()

    def _release(self, handle: Any) -> None:
        # NOTE: a handle that cannot be cancelled is reclaimed when the agent goes.
        with contextlib.suppress(Exception):
            self._agent.release_xfer_handle(handle)
