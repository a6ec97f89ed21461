"""KV transfer throughput: rooms of scattered pages vs one contiguous buffer, same engine, same run.

A decode process (multiprocessing spawn) holds a KV pool and a KVReceiver; this process holds
the prefill pool and a KVSender. Each room moves ``--tokens`` tokens of every layer's K and V from
randomly scattered source pages into randomly scattered destination pages (pools hold two rooms'
worth of pages, so runs rarely merge) through the full path: room request, descriptor building,
batched engine writes, metadata block, completion. Each room is paired with one write of a single
contiguous buffer of the same size through the same backend, alternating which goes first, so
load on the machine hits both alike. GB/s are 10^9 bytes per second. The last printed line is
JSON.

With `--prefill-tp P` / `--decode-tp D` each side is a tensor-parallel node: P (or D) pools, each
holding its share of the KV heads (head-major pages), each with its own engine; prefill ranks
1.. run in their own processes (rank agents, as a node's ranks do) and rank 0's sender writes
every head of a room from the rank that holds it into the decode rank that holds it. The
contiguous baseline stays one write of the room's bytes by one engine.

    python scripts/bench_transfer.py --backend mooncake --layout llama8b --page-tokens 64
    python scripts/bench_transfer.py --backend nixl --prefill-tp 2 --decode-tp 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from transfer import (
    KVBuffer,
    KVCompat,
    KVReceiver,
    KVSender,
    RoomMetadata,
    TransferConfig,
    TransferState,
)
from transfer.agent import RankAgent, RemoteBackend
from transfer.descriptors import DescriptorBatch
from transfer.ranks import RankKV


@dataclass(frozen=True)
class Layout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # bf16

    def page_bytes(self, page_tokens: int, tp: int = 1) -> int:
        return page_tokens * (self.kv_heads // tp) * self.head_dim * self.dtype_bytes

    def head_bytes(self, page_tokens: int) -> int:
        return page_tokens * self.head_dim * self.dtype_bytes


LAYOUTS = {"tiny": Layout(2, 2, 64), "llama8b": Layout(32, 8, 128)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("mooncake", "nixl", "nccl"), default="mooncake")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="llama8b")
    p.add_argument("--page-tokens", type=int, choices=(16, 64), default=64)
    p.add_argument("--rooms", type=int, default=0, help="default: 16 (llama8b) or 32 (tiny)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per room")
    p.add_argument("--batch", type=int, default=0, help="descriptors per batch (0: default)")
    p.add_argument("--inflight", type=int, default=0, help="batches in flight (0: default)")
    p.add_argument("--mooncake-lanes", type=int, default=0, help="TCP lanes per peer")
    p.add_argument(
        "--nixl-progress-delay-us", type=int, default=None,
        help="NIXL progress thread wake-up (0: NIXL's busy polling; default: TransferConfig's)",
    )  # fmt: skip
    p.add_argument("--prefill-tp", type=int, default=1, help="prefill ranks (KV heads split)")
    p.add_argument("--decode-tp", type=int, default=1, help="decode ranks (KV heads split)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    heads = LAYOUTS[args.layout].kv_heads
    if heads % args.prefill_tp or heads % args.decode_tp:
        p.error(f"--prefill-tp and --decode-tp must divide the layout's {heads} KV heads")
    return args


def make_config(args: argparse.Namespace) -> TransferConfig:
    overrides: dict[str, Any] = {"backend": args.backend, "mooncake_tcp_lanes": args.mooncake_lanes}
    if args.batch:
        overrides["max_batch_descriptors"] = args.batch
    if args.inflight:
        overrides["max_inflight_batches"] = args.inflight
    if args.nixl_progress_delay_us is not None:
        overrides["nixl_progress_delay_us"] = args.nixl_progress_delay_us
    return TransferConfig(**overrides)


def make_pool(args: argparse.Namespace, tp: int = 1) -> tuple[np.ndarray, list[KVBuffer], KVCompat]:
    """One rank's layer-major allocation [layers * (K, V), pages, page bytes] (its 1/tp of the
    heads; tp times the pages, so every pool holds two rooms' bytes for the contiguous write),
    touched so it is mapped."""
    layout = LAYOUTS[args.layout]
    page_bytes = layout.page_bytes(args.page_tokens, tp)
    pool_pages = 2 * tp * (args.tokens // args.page_tokens)
    pool = np.empty((2 * layout.layers, pool_pages, page_bytes), np.uint8)
    pool.fill(1)
    buffers = [KVBuffer.from_array(pool[i]) for i in range(pool.shape[0])]
    compat = KVCompat(args.layout, "bfloat16", args.page_tokens, layout.layers, "mha")
    return pool, buffers, compat


def rank_kv(
    args: argparse.Namespace, rank: int, tp: int, buffers: list[KVBuffer], **kw: Any
) -> RankKV:
    heads = LAYOUTS[args.layout].kv_heads // tp
    head_bytes = LAYOUTS[args.layout].head_bytes(args.page_tokens)
    return RankKV(rank, tuple(buffers), rank * heads, heads, head_bytes, **kw)


def prefill_rank_main(conn: Any, args: argparse.Namespace, rank: int) -> None:
    """Prefill rank > 0: its pool and engine, served to rank 0 until told to stop."""
    pool, buffers, _ = make_pool(args, args.prefill_tp)
    agent = RankAgent(make_config(args), buffers)
    conn.send((agent.address, rank_kv(args, rank, args.prefill_tp, buffers).to_wire()))
    conn.recv()
    agent.close()
    del pool


def decode_main(conn: Any, args: argparse.Namespace) -> None:
    """Decode process: open each room it is told about into random pages; report when done."""
    tp = args.decode_tp
    pools = [make_pool(args, tp) for _ in range(tp)]
    pool, buffers, compat = pools[0]
    agents = [RankAgent(make_config(args), p[1]) for p in pools[1:]]
    ranks = [rank_kv(args, 0, tp, buffers)] + [
        rank_kv(args, r, tp, pools[r][1], endpoint=agents[r - 1].endpoint) for r in range(1, tp)
    ]
    split = args.prefill_tp > 1 or args.decode_tp > 1
    receiver = KVReceiver(make_config(args), buffers, compat, ranks=ranks if split else ())
    conn.send((receiver.endpoint, pool.ctypes.data))
    rng = random.Random(args.seed + 1)
    while (msg := conn.recv()) is not None:
        room, address = msg
        pages = rng.sample(range(pool.shape[1]), args.tokens // args.page_tokens)
        receiver.open_room(room, address, pages)
        conn.send(wait_finished(receiver, room).state == TransferState.SUCCESS)
    receiver.close()


def wait_finished(side: KVSender | KVReceiver, room: int) -> Any:
    while True:
        for status in side.pop_finished():
            if status.room == room:
                return status
        time.sleep(0.0002)


def run_room(sender: KVSender, conn: Any, room: int, pages: list[int]) -> float:
    sender.open_room(room)
    conn.send((room, sender.bootstrap_address))
    while sender.status(room).state < TransferState.WAITING_FOR_INPUT:
        time.sleep(0.0002)
    start = time.perf_counter()
    sender.send(room, pages, RoomMetadata(first_token_id=1))
    status = wait_finished(sender, room)
    elapsed = time.perf_counter() - start
    if status.state != TransferState.SUCCESS or not conn.recv():
        raise SystemExit(f"room {room} failed: {status.reason}")
    return elapsed


def run_contiguous(sender: KVSender, peer: str, src: int, dst: int, nbytes: int) -> float:
    start = time.perf_counter()
    handle = sender.backend.submit(peer, DescriptorBatch.single(src, dst, nbytes))
    error = sender.backend.wait(handle, time.monotonic() + 600)
    if error:
        raise SystemExit(f"contiguous write failed: {error}")
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    rooms = args.rooms or (16 if args.layout == "llama8b" else 32)
    pool, buffers, compat = make_pool(args, args.prefill_tp)
    layout = LAYOUTS[args.layout]
    room_bytes = (
        2 * layout.layers * (args.tokens // args.page_tokens) * layout.page_bytes(args.page_tokens)
    )
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    decode = ctx.Process(target=decode_main, args=(child, args), daemon=True)
    decode.start()
    prefill_ranks = []
    for rank in range(1, args.prefill_tp):
        rank_conn, rank_child = ctx.Pipe()
        proc = ctx.Process(target=prefill_rank_main, args=(rank_child, args, rank), daemon=True)
        proc.start()
        prefill_ranks.append((rank_conn, proc))
    endpoint, decode_base = conn.recv()
    ranks, engines = [rank_kv(args, 0, args.prefill_tp, buffers)], []
    for rank_conn, _ in prefill_ranks:
        address, wire = rank_conn.recv()
        ranks.append(RankKV.from_wire(wire))
        engines.append(RemoteBackend(address, args.backend))
    split = args.prefill_tp > 1 or args.decode_tp > 1
    sender = KVSender(
        make_config(args), buffers, compat, ranks=ranks if split else (), rank_backends=engines
    )
    peer = sender.backend.connect(endpoint)
    rng = random.Random(args.seed)
    room_pages = args.tokens // args.page_tokens

    def one_room() -> float:
        pages = rng.sample(range(pool.shape[1]), room_pages)
        return run_room(sender, conn, rng.getrandbits(62), pages)

    def one_contiguous() -> float:
        return run_contiguous(sender, peer, pool.ctypes.data, decode_base, room_bytes)

    one_room(), one_contiguous()  # warm up connections and page tables
    room_times, contiguous_times = [], []
    for i in range(rooms):
        if i % 2:
            room_times.append(one_room())
            contiguous_times.append(one_contiguous())
        else:
            contiguous_times.append(one_contiguous())
            room_times.append(one_room())
        print(
            f"room {i}: {room_times[-1] * 1e3:.1f} ms, contiguous {contiguous_times[-1] * 1e3:.1f} ms"
        )
    conn.send(None)
    decode.join(30)
    sender.close()
    for rank_conn, _ in prefill_ranks:
        rank_conn.send(None)
    gbps = rooms * room_bytes / sum(room_times) / 1e9
    contiguous_gbps = rooms * room_bytes / sum(contiguous_times) / 1e9
    ms = sorted(t * 1e3 for t in room_times)
    result = {
        "backend": args.backend,
        "layout": args.layout,
        "page_tokens": args.page_tokens,
        "prefill_tp": args.prefill_tp,
        "decode_tp": args.decode_tp,
        "rooms": rooms,
        "bytes": rooms * room_bytes,
        "gbps": round(gbps, 3),
        "contiguous_gbps": round(contiguous_gbps, 3),
        "ratio": round(gbps / contiguous_gbps, 3),
        "room_p50_ms": round(statistics.median(ms), 2),
        "room_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
