"""The CPU decode attention kernel (engine/kernels/decode_attention.py) per layer, as a decode
step runs it: one query token per request against its context, read in place from scattered
pages of a pool larger than the batch needs.

Two timings, microseconds per layer call (medians):
- hot: the same layer again and again (its keys and values stay in the caches);
- cold: --layers layers in turn after a 128 MiB write flushed the caches, as in a decode step,
  where every layer's keys and values come from memory (a mid-size model's context does not
  fit the last-level cache).
The result is checked against a float64 reference first. The last printed line is JSON.

    python scripts/bench_decode_attention.py [--batch 16] [--heads 16] [--kv-heads 8]
        [--dim 64] [--context 290] [--page-size 16] [--dtype bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.kernels.decode_attention import DecodeAttention, build_decode_attention

FLUSH_BYTES = 128 * 1024 * 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--context", type=int, default=290, help="the longest request's tokens")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--layers", type=int, default=12, help="layers in turn for the cold timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    return p.parse_args()


class Case:
    """One batch's pages (a shuffled pool with room to spare) and one pool per layer."""

    def __init__(self, args: argparse.Namespace) -> None:
        gen = torch.Generator().manual_seed(0)
        dtype = getattr(torch, args.dtype)
        ps, b = args.page_size, args.batch
        per_request = -(-args.context // ps)
        pool_pages = 2 * b * per_request + 1  # page 0 stays reserved, as in the engine
        shape = (pool_pages, args.kv_heads, ps, args.dim)
        self.layers = [
            (
                torch.randn(shape, generator=gen).to(dtype),
                torch.randn(shape, generator=gen).to(dtype),
            )
            for _ in range(args.layers)
        ]
        order = torch.randperm(pool_pages - 1, generator=gen)[: b * per_request] + 1
        self.pages = order.view(b, per_request).long()
        # requests of different lengths, the longest `context`
        self.lens = torch.tensor([args.context - 3 * i for i in range(b)], dtype=torch.long)
        self.q = torch.randn(b, args.heads, args.dim, generator=gen)
        self.scale = args.dim**-0.5

    def run(self, kernel: DecodeAttention, layer: int) -> torch.Tensor:
        k, v = self.layers[layer]
        return kernel(self.q, k, v, self.pages, self.lens, self.scale)

    def reference(self, layer: int) -> torch.Tensor:
        k, v = self.layers[layer]
        heads, kv_heads = self.q.shape[1], k.shape[1]
        out = torch.empty(self.q.shape, dtype=torch.float64)
        for b, length in enumerate(self.lens.tolist()):
            rows = self.pages[b]
            keys = k[rows].transpose(0, 1).reshape(kv_heads, -1, k.shape[-1])[:, :length]
            values = v[rows].transpose(0, 1).reshape(kv_heads, -1, v.shape[-1])[:, :length]
            keys = keys.double().repeat_interleave(heads // kv_heads, 0)
            values = values.double().repeat_interleave(heads // kv_heads, 0)
            scores = torch.einsum("hd,htd->ht", self.q[b].double(), keys) * self.scale
            out[b] = torch.einsum("ht,htd->hd", scores.softmax(-1), values)
        return out


def main() -> None:
    args = parse_args()
    kernel = build_decode_attention(args.threads)
    if kernel is None:
        raise SystemExit("the decode attention kernel does not run on this CPU (see the log)")
    case = Case(args)
    error = float((case.run(kernel, 0).double() - case.reference(0)).abs().max())
    assert error < 1e-4, f"the kernel is off by {error}"
    hot = []
    for _ in range(args.repeats * 10):
        start = time.perf_counter()
        case.run(kernel, 0)
        hot.append(time.perf_counter() - start)
    flush = torch.zeros(FLUSH_BYTES // 4)
    cold = []
    for _ in range(args.repeats):
        flush.add_(1.0)
        start = time.perf_counter()
        for layer in range(args.layers):
            case.run(kernel, layer)
        cold.append((time.perf_counter() - start) / args.layers)
    result = {
        "shape": {k: getattr(args, k) for k in ("batch", "heads", "kv_heads", "dim", "context")},
        "dtype": args.dtype,
        "threads": args.threads,
        "hot_us": round(statistics.median(hot) * 1e6, 1),
        "cold_us": round(statistics.median(cold) * 1e6, 1),
        "max_error": error,
    }
    print(f"hot {result['hot_us']} us, cold {result['cold_us']} us per layer call")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
