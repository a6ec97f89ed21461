"""Mooncake Transfer Engine backend (``tcp`` anywhere, ``rdma`` where there are RDMA NICs).

Uses ``P2PHANDSHAKE`` metadata, so there is no central metadata service: a peer is addressed
by its session id ``ip:rpc_port`` and its buffer addresses come over our control plane.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .base import Endpoint, TransferBackend, TransferError
from .buffers import MemoryRegion
from .config import TransferConfig
from .descriptors import DescriptorBatch

_TCP_QUEUE_DEFAULTS = {
    "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER": "16384",
    "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER": "16384",
    "MC_TCP_ADMISSION_TIMEOUT_MS": "30000",
}


def _location(device: str) -> str:
    return "cpu:0" if device == "cpu" else device


class MooncakeBackend(TransferBackend):
    """Writes batches with ``batch_transfer_async_write`` and waits per batch."""

    name = "mooncake"
    # NOTE: with Mooncake's default TCP queue, one batch of 4096 descriptors fails outright.
    # Batches of 256 with a few in flight keep the lanes busy well under any queue limit.
    default_batch_descriptors = 256

    def __init__(
        self,
        host: str = "127.0.0.1",
        protocol: str = "tcp",
        device: str = "",
        tcp_lanes: int = 0,
        timeout_s: float = 0.0,
    ) -> None:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:
            raise TransferError(
                "transfer.backend=mooncake needs the Mooncake engine "
                "(pip install mooncake-transfer-engine, or -non-cuda on CPU machines)"
            ) from e
        # NOTE: Mooncake reads these only from the environment when the engine is built, so they
        # are per-process knobs. The per-peer TCP queue (1024 slices by default, with a 1 s
        # admission wait beyond it) is too short for several rooms writing to one decode at once;
        # an overflow fails the whole batch. Explicit environment settings win.
        if tcp_lanes:
            os.environ["MC_TCP_LANES_PER_PEER"] = str(tcp_lanes)
        for name, value in _TCP_QUEUE_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if timeout_s > 0:
            # a batch wait gives up with the room (transfer_timeout_s), not at Mooncake's 30 s:
            # sooner for a decode that hung, and never first for a large, slow, healthy room
            os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(math.ceil(timeout_s)))
        self._engine = TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device)
        if rc != 0:
            raise TransferError(
                f"Mooncake initialize({host!r}, P2PHANDSHAKE, {protocol!r}) returned {rc} "
                "(set transfer.host to an address of this machine; for rdma check transfer.device)"
            )
        self._session = f"{host}:{self._engine.get_rpc_port()}"
        self._registered: list[int] = []

    @classmethod
    def from_config(cls, config: TransferConfig) -> MooncakeBackend:
        return cls(
            config.host,
            config.protocol,
            config.device,
            config.mooncake_tcp_lanes,
            config.transfer_timeout_s,
        )

    def register(self, regions: Sequence[MemoryRegion]) -> None:
        for region in regions:
            rc = self._engine.register_memory(
                region.base_ptr, region.length, _location(region.device)
            )
            if rc != 0:
                raise TransferError(
                    f"Mooncake could not register {region.length} bytes at {region.base_ptr:#x} "
                    f"(rc {rc}; is the memory pinned/allocated and not registered twice?)"
                )
            self._registered.append(region.base_ptr)

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self._session)

    def connect(self, peer: Endpoint) -> str:
        return peer.session

    def disconnect(self, peer_key: str) -> None:
        """Mooncake drops a dead peer's segment on its own when a write to it fails."""

    def submit(self, peer_key: str, batch: DescriptorBatch) -> Any:
        batch_id = self._engine.batch_transfer_async_write(
            peer_key, batch.src.tolist(), batch.dst.tolist(), batch.lengths.tolist()
        )
        if batch_id <= 0:
            raise TransferError(f"Mooncake refused a batch of {len(batch)} to {peer_key}")
        return batch_id

    def wait(self, handle: Any, deadline: float) -> str:
        # NOTE: Mooncake bounds this wait itself (MC_TRANSFER_TIMEOUT: the room's transfer
        # timeout, see __init__); a dead peer fails it at once through a reset connection.
        rc = self._engine.get_batch_transfer_status([handle])
        return "" if rc == 0 else f"Mooncake batch failed (status {rc})"

    def close(self) -> None:
        for base in self._registered:
            self._engine.unregister_memory(base)
        self._registered.clear()
        self._engine = None
