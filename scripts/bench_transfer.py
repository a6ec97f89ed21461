"""KV transfer throughput: rooms of scattered pages vs one contiguous buffer, same engine, same run.

A decode process (multiprocessing spawn) holds a KV pool and a KVReceiver; this process holds
the prefill pool and a KVSender. Each room moves ``--tokens`` tokens of every layer's K and V from
randomly scattered source pages into randomly scattered destination pages (pools hold two rooms'
worth of pages, so runs rarely merge) through the full path: room request, descriptor building,
batched engine writes, metadata block, completion. Each room is paired with one write of a single
contiguous buffer of the same size through the same backend, alternating which goes first, so
load on the machine hits both alike. GB/s are 10^9 bytes per second. The last printed line is
JSON.

    python scripts/bench_transfer.py --backend mooncake --layout llama8b --page-tokens 64
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
from transfer.descriptors import DescriptorBatch


@dataclass(frozen=True)
class Layout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # bf16

    def page_bytes(self, page_tokens: int) -> int:
        return page_tokens * self.kv_heads * self.head_dim * self.dtype_bytes


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
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_config(args: argparse.Namespace) -> TransferConfig:
    overrides: dict[str, Any] = {"backend": args.backend, "mooncake_tcp_lanes": args.mooncake_lanes}
    if args.batch:
        overrides["max_batch_descriptors"] = args.batch
    if args.inflight:
        overrides["max_inflight_batches"] = args.inflight
    return TransferConfig(**overrides)


def make_pool(args: argparse.Namespace) -> tuple[np.ndarray, list[KVBuffer], KVCompat]:
    """One layer-major allocation [layers * (K, V), pages, page bytes], touched so it is mapped."""
    layout = LAYOUTS[args.layout]
    page_bytes = layout.page_bytes(args.page_tokens)
    pool_pages = 2 * (args.tokens // args.page_tokens)
    pool = np.empty((2 * layout.layers, pool_pages, page_bytes), np.uint8)
    pool.fill(1)
    buffers = [KVBuffer.from_array(pool[i]) for i in range(pool.shape[0])]
    compat = KVCompat(args.layout, "bfloat16", args.page_tokens, layout.layers, "mha")
    return pool, buffers, compat


def decode_main(conn: Any, args: argparse.Namespace) -> None:
    """Decode process: open each room it is told about into random pages; report when done."""
    pool, buffers, compat = make_pool(args)
    receiver = KVReceiver(make_config(args), buffers, compat)
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
    pool, buffers, compat = make_pool(args)
    room_bytes = pool.shape[0] * (args.tokens // args.page_tokens) * pool.shape[2]
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    decode = ctx.Process(target=decode_main, args=(child, args), daemon=True)
    decode.start()
    endpoint, decode_base = conn.recv()
    sender = KVSender(make_config(args), buffers, compat)
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
    gbps = rooms * room_bytes / sum(room_times) / 1e9
    contiguous_gbps = rooms * room_bytes / sum(contiguous_times) / 1e9
    ms = sorted(t * 1e3 for t in room_times)
    result = {
        "backend": args.backend,
        "layout": args.layout,
        "page_tokens": args.page_tokens,
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
