"""The transfer interface: room states, KV buffer views, room results and the backend ABC.

Transfer knows nothing of models. A KV pool is a set of buffers indexed by page; the transfer
layer sees each buffer only as (base pointer, bytes per page, stride between pages), so MHA
(K and V per layer), MLA (one latent buffer per layer), layer-major and page-major pools all
move through the same path.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .buffers import MemoryRegion
from .descriptors import DescriptorBatch

if TYPE_CHECKING:
    from .config import TransferConfig


# Reasons a room ends without a transfer that are not failures: decode prefilled the request
# itself (its local_prefill_threshold), or the client went away.
DECLINED = "declined by decode"
ABORTED_BY_CLIENT = "aborted by client"


class TransferState(enum.IntEnum):
    """Where a room is. States only move forward; FAILED is reachable from any live state."""

    BOOTSTRAPPING = 0
    WAITING_FOR_INPUT = 1
    TRANSFERRING = 2
    SUCCESS = 3
    FAILED = 4

    @property
    def is_final(self) -> bool:
        return self >= TransferState.SUCCESS

    def can_move_to(self, new: TransferState) -> bool:
        return not self.is_final and new > self


class IncompatiblePeerError(RuntimeError):
    """Prefill and decode cannot exchange KV pages (the message names both values and the fix)."""


class TransferError(RuntimeError):
    """A transfer engine failed to start or to register memory."""


@dataclass(frozen=True)
class RoomMetadata:
    """What prefill hands decode with the pages: the first token and how much was cached."""

    first_token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    cached_tokens: int = 0


@dataclass(frozen=True)
class TransferMetrics:
    """What one room's transfer cost."""

    bytes: int
    descriptors: int
    batches: int
    duration_s: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.duration_s / 1e9 if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class RoomStatus:
    """A room's state as one side sees it; final ones come back once from ``pop_finished``."""

    room: int
    state: TransferState
    reason: str = ""
    metadata: RoomMetadata | None = None
    metrics: TransferMetrics | None = None
    # decode: hold the room's pages this long before reusing them. Set when the room failed
    # without prefill confirming that it stopped writing (it went silent, or never confirmed an
    # abort): a hung, not dead, prefill could still land a late write there.
    quarantine_s: float = 0.0


def room_outcome(status: RoomStatus) -> str:
    """How a final room ended, for metrics: success, declined, aborted (by the client) or
    failed."""
    if status.state is TransferState.SUCCESS:
        return "success"
    if DECLINED in status.reason:
        return "declined"
    return "aborted" if ABORTED_BY_CLIENT in status.reason else "failed"


@dataclass(frozen=True)
class Endpoint:
    """What a peer needs to write into this engine: a session name and an engine blob."""

    backend: str
    session: str
    blob: bytes = b""
    device: str = "cpu"


class TransferBackend(ABC):
    """A transfer engine that writes local registered memory into a peer's registered memory.

    Implementations: ``mooncake`` (Mooncake Transfer Engine), ``nixl`` (NIXL/UCX), ``nccl``
    (torch.distributed point-to-point; decode's engine receives) and ``fake`` (in-process
    memmove, for state-machine unit tests only). One instance per node; ``submit`` and ``wait``
    may be called from several worker threads at once.
    """

    name: ClassVar[str]
    default_batch_descriptors: ClassVar[int] = 512

    @classmethod
    @abstractmethod
    def from_config(cls, config: TransferConfig) -> TransferBackend:
        """Build the engine from the node's transfer settings."""

    @abstractmethod
    def register(self, regions: Sequence[MemoryRegion]) -> None:
        """Make local memory readable/writable by the engine (before ``endpoint``)."""

    @abstractmethod
    def endpoint(self) -> Endpoint:
        """This engine's address, sent to peers in the registration message."""

    @abstractmethod
    def connect(self, peer: Endpoint) -> str:
        """Learn a peer we will write to; returns the key that ``submit`` takes."""

    @abstractmethod
    def disconnect(self, peer_key: str) -> None:
        """Forget a peer (it died or left)."""

    def abandon(self, peer_key: str) -> None:
        """The peer was dropped as dead: end our writes to it in flight now, where the engine
        can do so without writing anything more into the peer's memory. By default they end at
        the engine's own timeout; ``disconnect`` follows once none is in flight."""
        return None

    @abstractmethod
    def submit(self, peer_key: str, batch: DescriptorBatch) -> Any:
        """Start writing one batch; returns a handle for ``wait`` (raises on a failed submit)."""

    @abstractmethod
    def wait(self, handle: Any, deadline: float) -> str:
        """Block until the batch is done: "" on success, else why it failed."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine and deregister memory."""
