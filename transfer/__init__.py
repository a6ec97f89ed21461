"""Moving KV pages from a prefill node into pages a decode node reserved.

Transfer knows nothing of models: a KV pool is a list of ``KVBuffer`` views (base pointer,
bytes per page, number of pages, stride), one per layer for K and V (MHA) or one per layer
(MLA latent), and a room is (source page ids -> destination page ids) plus a small metadata
block. The bytes go through a real engine (``mooncake`` over tcp/rdma, ``nixl`` over UCX, or
``nccl``: torch.distributed point-to-point, NCCL on GPU and gloo on CPU);
the control plane is ZMQ + msgpack (``protocol.py``).

Prefill node::

    from transfer import KVBuffer, KVCompat, KVSender, RoomMetadata, TransferConfig

    config = TransferConfig(backend="mooncake", host="10.0.0.5", bootstrap_port=8998)
    compat = KVCompat(model="llama-3-8b", dtype="bfloat16", page_size=64, num_layers=32,
                      kv_layout="mha")
    buffers = [KVBuffer.from_array(t) for layer in pool for t in (layer.k, layer.v)]
    sender = KVSender(config, buffers, compat)          # serves sender.bootstrap_address
    sender.open_room(room)                              # on request arrival
    sender.send(room, src_pages, RoomMetadata(first_token_id=tok, logprob=lp, cached_tokens=n))
    for status in sender.pop_finished():                # SUCCESS or FAILED, once per room
        release_source_pages(status.room)

Decode node::

    receiver = KVReceiver(TransferConfig(backend="mooncake"), buffers, compat)
    receiver.open_room(room, f"{bootstrap_host}:{bootstrap_port}", dst_pages)
    for status in receiver.pop_finished():              # once per room, pages safe to reuse
        if status.state is TransferState.SUCCESS:
            run(status.room, status.metadata)
        else:
            free_pages(status.room)                      # status.reason says why

States move forward only: BOOTSTRAPPING -> WAITING_FOR_INPUT -> TRANSFERRING -> SUCCESS, or
FAILED from anywhere (timeouts on every waiting state, abort from either side, a dead peer, an
engine error). ``status(room)`` reports the state at any time; ``pop_finished()`` hands each
ended room back exactly once, and only when no write into its pages can still land, so the
caller frees pages exactly once. Both sides take any backend by name (``TransferConfig.backend``)
or an injected ``TransferBackend`` (the in-process ``fake`` one is for unit tests only).

Engine notes. Descriptors: runs of pages contiguous on both sides merge; batches stay under
``max_batch_descriptors`` (Mooncake 256, NIXL 4096, NCCL 1024 by default) with
``max_inflight_batches`` of them submitted at once; at most ``num_workers`` rooms are written to one decode at once, and
the writer pool grows past a decode that hangs (its waits block a thread until the engine gives
up), so the other decodes' rooms never queue behind it. Mooncake: ``P2PHANDSHAKE`` (no
metadata service); its TCP per-peer queue is raised through ``MC_TCP_*`` environment defaults
(explicit settings win) and a batch's wait is bounded by Mooncake's own ``MC_TRANSFER_TIMEOUT``,
which defaults to the room's ``transfer_timeout_s``.
NIXL: UCX backend, no listener thread; on machines without RDMA devices ``UCX_MODULES=^ib`` is
set by default (loading UCX's IB modules there crashes the process at exit).
NCCL: two-sided, so decode's engine listens on ``transfer.host`` and serves each prefill pair
with a thread that receives batches and scatters them into place; a pair's 2-rank group (never
the default one) is built from a TCPStore that prefill hosts; ranges under 64 KiB (4 MiB with
NCCL) are gathered into one staging message per batch, longer ones sent as they lie (nccl.py).
"""

from __future__ import annotations

from .base import (
    ABORTED_BY_CLIENT,
    DECLINED,
    Endpoint,
    IncompatiblePeerError,
    RoomMetadata,
    RoomStatus,
    TransferBackend,
    TransferError,
    TransferMetrics,
    TransferState,
    room_outcome,
)
from .buffers import KVBuffer, MemoryRegion
from .compat import KVCompat, check_compatible
from .config import TransferConfig
from .receiver import KVReceiver
from .registry import BACKENDS, NO_TRANSFER, check_backend, create_backend, served_backends
from .sender import KVSender

__all__ = [
    "ABORTED_BY_CLIENT",
    "BACKENDS",
    "DECLINED",
    "NO_TRANSFER",
    "Endpoint",
    "IncompatiblePeerError",
    "KVBuffer",
    "KVCompat",
    "KVReceiver",
    "KVSender",
    "MemoryRegion",
    "RoomMetadata",
    "RoomStatus",
    "TransferBackend",
    "TransferConfig",
    "TransferError",
    "TransferMetrics",
    "TransferState",
    "check_backend",
    "check_compatible",
    "create_backend",
    "room_outcome",
    "served_backends",
]
