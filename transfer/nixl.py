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

import msgpack
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


Span = tuple[int, int, str]
"""A registered region: [start, end) and its device ("cpu", "cuda:N")."""


def _device_at(spans: Sequence[Span], addr: int, whose: str) -> str:
    """The device of the registered region holding `addr`."""
    for start, end, device in spans:
        if start <= addr < end:
            return device
    raise TransferError(f"address {addr:#x} is in no region {whose} registered with NIXL")


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
        # NOTE: a node registers its KV pages (on its GPU) beside metadata slots or staging (on
        # its CPU); each batch is all of one or all of the other, so its memory type (DRAM or
        # VRAM) is that of the region its first address falls in, on each side
        self._spans: list[Span] = []
        self._remote_spans: dict[str, list[Span]] = {}

    @classmethod
    def from_config(cls, config: TransferConfig) -> NixlBackend:
        return cls(config.nixl_threads, config.nixl_progress_delay_us)

    def register(self, regions: Sequence[MemoryRegion]) -> None:
        for region in regions:
            mem, dev = _mem_type(region.device)
            reg = self._agent.register_memory([(region.base_ptr, region.length, dev, "")], mem)
            if reg is None:
                raise TransferError(f"NIXL could not register {region.length} bytes ({mem})")
            self._registered.append(reg)
            self._spans.append((region.base_ptr, region.base_ptr + region.length, region.device))

    def endpoint(self) -> Endpoint:
        """The agent's metadata and our regions' devices (a peer's descriptors name them)."""
        blob = msgpack.packb([self._agent.get_agent_metadata(), self._spans])
        device = next((d for _, _, d in self._spans if d != "cpu"), "cpu")
        return Endpoint(self.name, self._agent.name, blob, device)

    def connect(self, peer: Endpoint) -> str:
        if peer.session in self._remote_spans:
            self.disconnect(peer.session)
        try:
            metadata, spans = msgpack.unpackb(peer.blob)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise TransferError(f"NIXL peer {peer.session} sent an endpoint we cannot read") from e
        name = self._agent.add_remote_agent(metadata)
        key = name.decode() if isinstance(name, bytes) else name
        self._remote_spans[key] = [(int(a), int(b), str(d)) for a, b, d in spans]
        return key

    def disconnect(self, peer_key: str) -> None:
        if self._remote_spans.pop(peer_key, None) is not None:
            with contextlib.suppress(Exception):  # already gone; nothing to undo
                self._agent.remove_remote_agent(peer_key)

    def submit(self, peer_key: str, batch: DescriptorBatch) -> Any:
        remote_spans = self._remote_spans.get(peer_key)
        if remote_spans is None:
            raise TransferError(f"NIXL peer {peer_key} is not connected")
        local, remote = "cpu", "cpu"  # an empty batch names no memory
        if len(batch):
            local = _device_at(self._spans, int(batch.src[0]), "we")
            remote = _device_at(remote_spans, int(batch.dst[0]), f"peer {peer_key}")
        (local_mem, local_dev), (remote_mem, remote_dev) = _mem_type(local), _mem_type(remote)
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
        for peer in list(self._remote_spans):
            self.disconnect(peer)
        for reg in self._registered:
            self._agent.deregister_memory(reg)
        self._registered.clear()
        self._spans.clear()

    def _release(self, handle: Any) -> None:
        # NOTE: a handle that cannot be cancelled is reclaimed when the agent goes.
        with contextlib.suppress(Exception):
            self._agent.release_xfer_handle(handle)
