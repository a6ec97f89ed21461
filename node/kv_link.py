"""The KV link: an engine's page pool seen as transfer buffers, and the node's sender/receiver.

The transfer layer knows no models: it sees each per-layer buffer of the pool as (base pointer,
bytes per page, stride), plus the facts a peer must agree on (`KVCompat`). This is where the
engine's pool and the transfer package meet.
"""

from __future__ import annotations

from engine.engine import Engine
from engine.kv.pool import PagePool
from node.settings import NodeSettings
from transfer import KVBuffer, KVCompat, KVReceiver, KVSender


def check_one_rank(engine: Engine) -> None:
    """KV moves between single-rank engines only, for now."""
    if engine.group is not None:
        raise ValueError(
            f"a prefill/decode node with tp_size {engine.options.tp_size} cannot exchange KV "
            "pages yet (run tp_size 1 on PD nodes, or a decode node with transfer.backend: none "
            "that serves requests whole)"
        )


def pool_view(pool: PagePool, model: str) -> tuple[list[KVBuffer], KVCompat]:
    """The pool's buffers and what a peer must agree on to exchange pages with it."""
    buffers = [KVBuffer.from_array(b) for b in pool.buffers()]
    compat = KVCompat(
        model=model,
        dtype=str(pool.layout.dtype).removeprefix("torch."),
        page_size=pool.page_size,
        num_layers=pool.layout.num_layers,
        kv_layout=pool.layout.kind,
    )
    return buffers, compat


def build_sender(engine: Engine, settings: NodeSettings) -> KVSender:
    """The prefill node's sender: its bootstrap server listens on transfer.bootstrap_port."""
    check_one_rank(engine)
    return KVSender(settings.transfer, *pool_view(engine.pool, settings.model_name))


def build_receiver(engine: Engine, settings: NodeSettings) -> KVReceiver:
    check_one_rank(engine)
    return KVReceiver(settings.transfer, *pool_view(engine.pool, settings.model_name))
