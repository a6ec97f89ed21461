"""NCCL backend: KV bytes as torch.distributed point-to-point messages between prefill and decode.

Unlike Mooncake and NIXL, point-to-point needs the receiver to take part, so the decode engine
serves its pairs (``nccl_serve.py``): a thread per prefill receives each batch, writes it into
registered memory and confirms it. The group is NCCL where both ends hold their KV on CUDA and
gloo otherwise (CPU, and the tests): one 2-rank group per pair, built when prefill first writes
to a decode (again after a pair broke) from a TCPStore that the prefill engine hosts, never
from a process's default group. The control socket and the group are ``nccl_link.py``; the
prefill side of a pair is ``nccl_pair.py``; registered memory as tensors is ``nccl_memory.py``.

A batch leaves prefill as a header (destinations and lengths) and its bytes: ranges shorter
than ``DIRECT_BYTES`` are gathered back to back into one staging tensor, one message; longer
ones go as messages of their own, with no copy at either end.

Settings: ``transfer.host`` (decode listens there, prefill hosts its TCPStore there),
``bootstrap_timeout_s`` bounds a writer's wait for a pair to open, ``transfer_timeout_s`` a
batch on decode's side (on prefill's, the room's deadline does).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch.distributed as dist

from .base import Endpoint, TransferBackend, TransferError
from .buffers import MemoryRegion
from .config import TransferConfig
from .descriptors import DescriptorBatch
from .nccl_link import CODEC, DecodeAddress, LinkError, gpu_identity, group_kind
from .nccl_memory import RegionMap, StagingPool
from .nccl_pair import Batch, PrefillPair
from .nccl_serve import PairServer

# NOTE: on CPU/gloo (scripts/bench_transfer.py, llama8b) 128 KiB ranges went 1.5x faster as
# messages of their own than staged, 32 KiB ranges 1.7x slower: a message costs ~50-90 us, a
# staged byte two copies. On NCCL a GPU copy is cheap next to a message, so only large ranges
# skip the staging there (not measured: no GPU here).
DIRECT_BYTES = {"gloo": 64 << 10, "nccl": 4 << 20}
STAGING_BYTES = 64 << 20  # a batch over this goes out as several, to bound staging memory
KEEP_STAGING_BYTES = 256 << 20  # CPU staging kept for reuse, per engine


@dataclass
class _Peer:
    """A decode engine we were told to write to; its pair is opened on first use."""

    address: DecodeAddress
    kind: str
    pair: PrefillPair | None = None
    closed: str = ""  # why it was closed (abandoned or disconnected); empty while open
    opening: Future[PrefillPair] | None = None  # the rendezvous under way, if one is
    lock: threading.Lock = field(default_factory=threading.Lock)


class NcclBackend(TransferBackend):
    """Writes each batch as a header plus point-to-point messages; decode confirms each one."""

    name = "nccl"
    default_batch_descriptors = 1024

    def __init__(
        self, host: str = "127.0.0.1", timeout_s: float = 60.0, connect_timeout_s: float = 30.0
    ) -> None:
        self._host = host
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._regions = RegionMap()
        self._staging = StagingPool(KEEP_STAGING_BYTES)
        self._server: PairServer | None = None  # decode side
        self._store: Any = None  # prefill side: the TCPStore our pairs build their groups from
        self._store_lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._keys = itertools.count()

    @classmethod
    def from_config(cls, config: TransferConfig) -> NcclBackend:
        return cls(config.host, config.transfer_timeout_s, config.bootstrap_timeout_s)

    def register(self, regions: Sequence[MemoryRegion]) -> None:
        self._regions.add(regions)

    def endpoint(self) -> Endpoint:
        """Starts serving pairs (only a decode engine asks for its endpoint)."""
        if self._server is None:
            self._server = PairServer(
                self._host, self._regions, self._timeout_s, self._connect_timeout_s
            )
        address = self._server.address
        session = f"{address.host}:{address.port}"
        return Endpoint(self.name, session, CODEC.encode(address), self._regions.device)

    @property
    def served_pairs(self) -> int:
        """Decode side: prefill pairs being served now (each holds a thread and a group)."""
        return self._server.live_pairs() if self._server is not None else 0

    def connect(self, peer: Endpoint) -> str:
        try:
            address = CODEC.decode(peer.blob)
        except LinkError as e:
            raise TransferError(f"nccl: bad endpoint from {peer.session}: {e}") from None
        if not isinstance(address, DecodeAddress):
            raise TransferError(f"nccl: endpoint from {peer.session} holds no decode address")
        # NOTE: a key per connect, so that forgetting an old registration of a decode never
        # tears down the pair of its new one
        key = f"{peer.session}#{next(self._keys)}"
        same_gpu = bool(address.gpu) and address.gpu == gpu_identity(self._regions.device)
        self._peers[key] = _Peer(address, group_kind(self._regions.device, peer.device, same_gpu))
        return key

    def disconnect(self, peer_key: str) -> None:
        peer = self._peers.pop(peer_key, None)
        if peer is not None:
            self._close_peer(peer, "disconnected")

    def abandon(self, peer_key: str) -> None:
        """Break the peer's pair: every batch in flight fails at once (decode writes its pages
        itself, so nothing lands after its end of the pair breaks too), and none reopens it."""
        peer = self._peers.get(peer_key)
        if peer is not None:
            self._close_peer(peer, "decode dropped", join=False)

    def submit(self, peer_key: str, batch: DescriptorBatch) -> Any:
        peer = self._peers.get(peer_key)
        if peer is None:
            raise TransferError(f"nccl: unknown peer {peer_key} (connect first)")
        pair = self._pair(peer)
        return [self._post(pair, part) for part in _split(batch, STAGING_BYTES)]

    def wait(self, handle: Any, deadline: float) -> str:
        errors = [batch.pair.wait(batch, deadline) for batch in handle]
        for batch, error in zip(handle, errors, strict=True):
            if batch.staging is not None and not error:
                self._staging.give(batch.staging)
        return next((e for e in errors if e), "")

    def close(self) -> None:
        for key in list(self._peers):
            self.disconnect(key)
        if self._server is not None:
            self._server.close()
            self._server = None
        self._store = None

    def _pair(self, peer: _Peer) -> PrefillPair:
        """The peer's live pair, opened now if it has none or its last one broke.

        The rendezvous runs on a thread of its own, and every writer that needs the pair
        meanwhile waits for that one attempt, ``connect_timeout_s`` at most, or until the peer
        is abandoned: a decode that dies or stops mid-rendezvous can hold gloo's connect for
        longer than our timeout, and must not hold the rooms of the writers waiting on it."""
        with peer.lock:
            if peer.closed:
                raise TransferError(f"nccl: {peer.closed}")
            if peer.pair is not None and not peer.pair.broken:
                return peer.pair
            if peer.opening is None:
                peer.opening = Future()
                name = f"nccl-open-{peer.address.host}:{peer.address.port}"
                threading.Thread(
                    target=self._open_pair, args=(peer, peer.opening), name=name, daemon=True
                ).start()
            opening = peer.opening
        try:
            return opening.result(self._connect_timeout_s)
        except TransferError as e:  # one exception object, shared by every waiter: a new one
            raise TransferError(str(e)) from None
        except FutureTimeout:
            where = f"{peer.address.host}:{peer.address.port}"
            raise TransferError(
                f"nccl: no pair with decode {where} within {self._connect_timeout_s:g}s"
            ) from None

    def _open_pair(self, peer: _Peer, opening: Future[PrefillPair]) -> None:
        """The rendezvous (its own thread): hand the pair, or why there is none, to the writers
        waiting for it; close the pair when none waits any more (the peer was abandoned or
        disconnected meanwhile: that already failed `opening`)."""
        pair, error = None, None
        try:
            pair = PrefillPair.open(
                peer.address,
                self._store_address(),
                peer.kind,
                self._host,
                self._regions.device,
                self._timeout_s,
                self._connect_timeout_s,
            )
        except TransferError as e:
            error = e
        except Exception as e:  # whatever it was, the waiters hear it; the next write retries
            where = f"{peer.address.host}:{peer.address.port}"
            error = TransferError(f"nccl: cannot open a pair with decode {where}: {e!r}")
        with peer.lock:
            peer.opening = None  # only this thread ends the attempt `_pair` started
            wanted = not opening.done()
            if wanted and pair is not None:
                peer.pair = pair
                opening.set_result(pair)
            elif wanted:
                opening.set_exception(error)
        if pair is not None and not wanted:
            pair.close("nccl: peer disconnected")

    def _store_address(self) -> tuple[str, int]:
        with self._store_lock:
            if self._store is None:
                self._store = dist.TCPStore(
                    self._host,
                    0,
                    is_master=True,
                    wait_for_workers=False,
                    timeout=timedelta(seconds=self._connect_timeout_s),
                )
            return self._host, self._store.port

    def _close_peer(self, peer: _Peer, reason: str, join: bool = True) -> None:
        with peer.lock:
            peer.closed = reason
            pair, peer.pair = peer.pair, None
            if peer.opening is not None and not peer.opening.done():
                # wakes every writer waiting for the rendezvous; its thread closes what it opens
                peer.opening.set_exception(TransferError(f"nccl: {reason}"))
        if pair is not None:
            pair.close(f"nccl: {reason}")
            if join:
                pair.join(1.0)

    def _post(self, pair: PrefillPair, batch: DescriptorBatch) -> Batch:
        """Gather the batch's short ranges into staging, then send it."""
        try:
            index = self._regions.locate(batch.src, batch.lengths)
        except ValueError as e:
            raise TransferError(f"nccl: source {e}") from None
        device = pair.link.device
        direct = batch.lengths >= DIRECT_BYTES[pair.link.kind]
        direct &= self._regions.on_device(index, device)
        # staged ranges first, grouped by (region, length) so each group gathers in one copy
        order = np.lexsort((batch.src, batch.lengths, index, direct))
        staged = int(len(order) - direct.sum())
        messages, staging = [], None
        head = order[:staged]
        nbytes = int(batch.lengths[head].sum())
        if nbytes:
            staging = self._staging.take(nbytes, device)
            gathered = staging[:nbytes]
            self._regions.gather(batch.src[head], batch.lengths[head], index[head], gathered)
            messages.append(gathered)
        for i in order[staged:]:
            src, length, region = int(batch.src[i]), int(batch.lengths[i]), int(index[i])
            messages.append(self._regions.view(src, length, region))
        posted = pair.post(batch.dst[order], batch.lengths[order], staged, messages)
        posted.staging = staging
        return posted


def _split(batch: DescriptorBatch, max_bytes: int) -> list[DescriptorBatch]:
    """Cut a batch into pieces of about ``max_bytes`` (whole ranges; one at least per piece)."""
    if batch.nbytes <= max_bytes:
        return [batch]
    starts = np.cumsum(batch.lengths) - batch.lengths
    piece = starts // np.uint64(max_bytes)
    cuts = np.flatnonzero(np.diff(piece)) + 1
    return [
        DescriptorBatch(s, d, n)
        for s, d, n in zip(
            np.split(batch.src, cuts),
            np.split(batch.dst, cuts),
            np.split(batch.lengths, cuts),
            strict=True,
        )
    ]
