"""One MoE layer's expert-parallel token exchange, timed: the host-sized exchange (what prefill
uses) against the fixed-capacity one (every decode step's, and what a CUDA graph holds), between
--ranks processes over gloo, at decode batch sizes, with the routed experts' compute included.

Each rank routes `rows` tokens of its own (DP attention's case) with DeepSeek-style top-k over
--experts experts spread over the ranks; a call is `dispatch_combine` or `exchange_fixed` of the
same tokens, and both give the same sums (checked each run). The last printed line is JSON:
milliseconds per call (median of --iters) by batch, on rank 0.

    python scripts/bench_ep_exchange.py [--rows 1 8 32 128] [--hidden 1024] [--experts 16]
        [--top-k 4] [--inter 512] [--ranks 2] [--iters 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.arch_config import MoEConfig
from engine.layers.ep import dispatch_combine, exchange_fixed
from engine.layers.moe import RoutedExperts
from engine.parallel.group import Parallel
from engine.parallel.ranks import new_group


def moe_config(args: argparse.Namespace) -> MoEConfig:
    return MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        intermediate_size=args.inter,
        num_shared_experts=0,
        first_dense_layers=0,
        layer_freq=1,
        scoring="sigmoid",
        topk_method="greedy",
        num_groups=1,
        topk_groups=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
    )


def timed(call: Any, args: tuple, iters: int) -> float:
    """Median milliseconds of `call(*args)` over `iters` runs, after 3 to warm up."""
    samples = []
    for i in range(iters + 3):
        start = time.perf_counter()
        call(*args)
        if i >= 3:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def rank_main(rank: int, args: argparse.Namespace, port: int, out: Any) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, args.ranks, rank == 0, timedelta(seconds=60))
    group = new_group(store, "bench", rank, args.ranks, timedelta(seconds=60), "cpu")
    tp = Parallel(rank, args.ranks, group, ep=True)
    gen = torch.Generator().manual_seed(rank)
    experts = RoutedExperts(args.hidden, moe_config(args), tp, use_fused=False)
    with torch.no_grad():
        experts.gate_up_proj.normal_(generator=gen).mul_(0.05)
        experts.down_proj.normal_(generator=gen).mul_(0.05)
    result = {}
    for rows in args.rows:
        x = torch.randn(rows, args.hidden, generator=gen)
        weights = torch.rand(rows, args.top_k, generator=gen)
        ids = torch.rand(rows, args.experts, generator=gen).topk(args.top_k).indices
        with torch.no_grad():
            counted = dispatch_combine(experts, x, weights, ids, tp)
            fixed = exchange_fixed(experts, x, weights, ids, tp, rows)
            torch.testing.assert_close(fixed, counted, atol=1e-4, rtol=1e-4)
            routed = (experts, x, weights, ids, tp)
            result[rows] = {
                "host_sized_ms": timed(dispatch_combine, routed, args.iters),
                "fixed_ms": timed(exchange_fixed, (*routed, rows), args.iters),
            }
    if rank == 0:
        out.put(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--port", type=int, default=29731)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=rank_main, args=(r, args, args.port, out)) for r in range(args.ranks)
    ]
    for proc in procs:
        proc.start()
    result = out.get(timeout=600)
    for proc in procs:
        proc.join(timeout=60)
    for rows, times in result.items():
        print(f"rows {rows:4d}: host-sized {times['host_sized_ms']:.3f} ms, "
              f"fixed {times['fixed_ms']:.3f} ms")  # fmt: skip
    config = {k: getattr(args, k) for k in ("hidden", "experts", "top_k", "inter", "ranks")}
    print(json.dumps({**config, "ms_per_call": result}))


if __name__ == "__main__":
    main()
