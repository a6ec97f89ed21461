"""The KV link: an engine's page pool seen as transfer buffers, and the node's sender/receiver.

The transfer layer knows no models: it sees each per-layer buffer of the pool as (base pointer,
bytes per page, stride), plus the facts a peer must agree on (`KVCompat`) and, per rank, which
KV heads the rank's pool holds (`RankKV`). This is where the engine's pool and the transfer
package meet.

A tensor-parallel node: every rank other than 0 starts a `RankAgent` (its own engine over its
own pool) as soon as its model is loaded (`start_rank_agent`, the engine's rank setup) and
publishes where it is in the rank group's store; rank 0 builds the sender or receiver over all
ranks from those.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import msgpack

from engine.config import ModelConfig
from engine.engine import Engine
from engine.kv.pool import PagePool
from engine.parallel.group import Parallel
from engine.parallel.worker import RankSetup
from node.settings import NodeSettings
from transfer import KVBuffer, KVCompat, KVReceiver, KVSender, TransferConfig
from transfer.agent import RankAgent, RemoteBackend
from transfer.ranks import RankKV

AGENT_TIMEOUT_S = 120.0  # rank 0 waits this long for the other ranks' engines


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


def rank_view(pool: PagePool, cfg: ModelConfig, tp: Parallel, rank: int) -> RankKV:
    """One rank's pool for the transfer layer: MHA pages are head-major, so a range of heads
    of a page is one byte range; MLA's latent is the same on every rank."""
    buffers = tuple(KVBuffer.from_array(b) for b in pool.buffers())
    layout = pool.layout
    if layout.kind != "mha":
        return RankKV(rank, buffers)
    first, count = tp.kv_heads(cfg.num_kv_heads)
    head_bytes = layout.head_page_bytes(pool.page_size)
    return RankKV(rank, buffers, first, count, head_bytes)


def rank_setup(settings: NodeSettings) -> RankSetup | None:
    """What each other rank of a PD node starts once loaded: its transfer engine."""
    if settings.role == "decode" and settings.transfer.backend == "none":
        return None
    return ("node.kv_link:start_rank_agent", settings.transfer)


def start_rank_agent(runner: Any, group: Any, config: TransferConfig) -> RankAgent:
    """In rank r (r > 0): an engine over this rank's pool, announced in the group's store."""
    agent = RankAgent(config, [KVBuffer.from_array(b) for b in runner.pool.buffers()])
    view = rank_view(runner.pool, runner.model_cfg, group.parallel, group.rank)
    view = dataclasses.replace(view, endpoint=agent.endpoint)
    group.store.set(f"kv-agent/{group.rank}", msgpack.packb([agent.address, view.to_wire()]))
    return agent


def all_ranks(engine: Engine) -> tuple[list[RankKV], list[str]]:
    """Every rank's view (rank 0 first) and the agents' addresses of ranks 1.."""
    group = engine.group
    tp = group.parallel if group is not None else Parallel.single()
    views = [rank_view(engine.pool, engine.model_cfg, tp, 0)]
    addresses: list[str] = []
    if group is None:
        return views, addresses
    keys = [f"kv-agent/{rank}" for rank in range(1, group.size)]
    deadline = time.monotonic() + AGENT_TIMEOUT_S
    while not group.store.check(keys):  # a rank that dies meanwhile is said at once
        gone = [r for r in group.describe() if r["exitcode"] is not None]
        if gone or time.monotonic() > deadline:
            raise RuntimeError(
                f"the transfer engines of ranks {keys} did not start in time ({gone or 'alive'})"
            )
        time.sleep(0.05)
    for key in keys:
        address, wire = msgpack.unpackb(group.store.get(key), use_list=False)
        views.append(RankKV.from_wire(wire))
        addresses.append(address)
    return views, addresses


def build_sender(engine: Engine, settings: NodeSettings) -> KVSender:
    """The prefill node's sender: its bootstrap server listens on transfer.bootstrap_port."""
    views, addresses = all_ranks(engine)
    engines = [RemoteBackend(a, settings.transfer.backend) for a in addresses]
    buffers, compat = pool_view(engine.pool, settings.model_name)
    return KVSender(settings.transfer, buffers, compat, ranks=views, rank_backends=engines)


def build_receiver(engine: Engine, settings: NodeSettings) -> KVReceiver:
    views, _ = all_ranks(engine)
    buffers, compat = pool_view(engine.pool, settings.model_name)
    return KVReceiver(settings.transfer, buffers, compat, ranks=views)
