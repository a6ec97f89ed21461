"""An in-process backend for unit tests of the room state machine. Never a real transport.

Both sides must live in one process (it copies with ``memmove``). Knobs let tests make writes
slow (``delay_s``), hold them until an event is set (``gate``), or fail (``fail_batches``).
"""

from __future__ import annotations

import ctypes
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from .base import Endpoint, TransferBackend, TransferError
from .buffers import MemoryRegion
from .config import TransferConfig
from .descriptors import DescriptorBatch


class FakeBackend(TransferBackend):
    """memmove between two buffers of one process, with injectable delay and failure."""

    name = "fake"

    def __init__(
        self,
        delay_s: float = 0.0,
        gate: threading.Event | None = None,
        fail_batches: bool = False,
    ) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.fail_batches = fail_batches
        self.batches_written = 0
        self.writing = threading.Event()  # set once a write has started (tests wait for it)
        self._session = f"fake-{uuid.uuid4().hex[:8]}"
        self._peers: set[str] = set()

    @classmethod
    def from_config(cls, config: TransferConfig) -> FakeBackend:
        return cls()

    def register(self, regions: Sequence[MemoryRegion]) -> None:
        """Nothing to register in-process."""

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self._session)

    def connect(self, peer: Endpoint) -> str:
        self._peers.add(peer.session)
        return peer.session

    def disconnect(self, peer_key: str) -> None:
        self._peers.discard(peer_key)

    def submit(self, peer_key: str, batch: DescriptorBatch) -> Any:
        if peer_key not in self._peers:
            raise TransferError(f"fake backend: unknown peer {peer_key}")
        return batch, time.monotonic() + self.delay_s

    def wait(self, handle: Any, deadline: float) -> str:
        batch, ready_at = handle
        self.writing.set()
        if self.gate is not None and not self.gate.wait(max(0.0, deadline - time.monotonic())):
            return "fake batch timed out at the gate"
        time.sleep(max(0.0, min(ready_at, deadline) - time.monotonic()))
        if self.fail_batches:
            return "fake batch failed on purpose"
        for src, dst, length in zip(batch.src, batch.dst, batch.lengths, strict=True):
            ctypes.memmove(int(dst), int(src), int(length))
        self.batches_written += 1
        return ""

    def close(self) -> None:
        self._peers.clear()
