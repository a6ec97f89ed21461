"""Each attention backend against the torch backend on CUDA, at real layer shapes: Llama-3.1-8B's
GQA layer (32 query heads, 8 KV heads, head_dim 128) and DeepSeek-V3's MLA at TP 8 (16 heads,
latent 512 + rope 64), bfloat16, 64-token pages. One mixed step (decoding requests with long
contexts beside prefill chunks over a cached prefix) checks the output and the written cache;
a decode-only step is timed. Backends not installed are skipped, saying so. Last line JSON.

    python scripts/gpu_kernels.py [--backends triton,flashinfer]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from typing import Any

import torch

from engine.kv.pool import KVLayout, PagePool
from engine.layers.attention import create_backend
from engine.layers.attention.base import AttentionBatch

PAGE = 64
DECODE_CONTEXTS = [4000, 1500, 900, 64, 3333, 2048, 17, 1024]
EXTENDS = [(512, 128), (0, 200)]  # (cached prefix, new tokens)


def batch(page_size: int, num_pages: int, decode_only: bool, seed: int) -> AttentionBatch:
    """Requests over disjoint random pages: the decoders, then (unless decode_only) extends."""
    gen = torch.Generator().manual_seed(seed)
    free = (torch.randperm(num_pages, generator=gen) + 1).tolist()
    q_lens, kv_lens, tables = [], [], []
    reqs = [(c - 1, 1) for c in DECODE_CONTEXTS] + ([] if decode_only else EXTENDS)
    for cached, new in reqs:
        kv = cached + new
        need = -(-kv // page_size)
        tables.append([free.pop() for _ in range(need)])
        q_lens.append(new)
        kv_lens.append(kv)
    return AttentionBatch(q_lens, kv_lens, tables, page_size)


def pools(layout: KVLayout, num_pages: int) -> tuple[PagePool, PagePool]:
    """Two pools with the same random contents."""
    a = PagePool(layout, num_pages, PAGE, "cuda")
    b = PagePool(layout, num_pages, PAGE, "cuda")
    for x, y in zip(a.buffers(), b.buffers(), strict=True):
        x.normal_()
        y.copy_(x)
    return a, b


def step(backend: Any, b: AttentionBatch, inputs: tuple[torch.Tensor, ...], mla: bool) -> Any:
    meta = backend.prepare(b)
    if mla:
        return backend.forward_mla(*inputs, 0, meta)
    return backend.forward(*inputs, 0, meta)


def inputs_for(layout: KVLayout, heads: int, tokens: int, mla: bool) -> tuple[torch.Tensor, ...]:
    dt, dev = torch.bfloat16, "cuda"
    if mla:
        r, p = layout.kv_lora_rank, layout.rope_dim
        shapes = [(tokens, heads, r), (tokens, heads, p), (tokens, r), (tokens, p)]
    else:
        d, kv = layout.head_dim, layout.num_kv_heads
        shapes = [(tokens, heads, d), (tokens, kv, d), (tokens, kv, d)]
    return tuple(torch.randn(s, dtype=dt, device=dev) for s in shapes)


def timed(fn: Any, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def compare(name: str, case: str, layout: KVLayout, heads: int, scale: float) -> dict[str, Any]:
    mla, num_pages = layout.kind == "mla", 1024
    ref_pool, pool = pools(layout, num_pages)
    ref, cand = create_backend("torch", ref_pool, scale), create_backend(name, pool, scale)
    mixed = batch(PAGE, num_pages, False, seed=1)
    x = inputs_for(layout, heads, mixed.num_tokens, mla)
    want, got = step(ref, mixed, x, mla), step(cand, mixed, x, mla)
    out_err = (want.float() - got.float()).abs().max().item()
    cache_err = max(
        (a.float() - b.float()).abs().max().item()
        for a, b in zip(ref_pool.buffers(), pool.buffers(), strict=True)
    )
    decode = batch(PAGE, num_pages, True, seed=2)
    xd = inputs_for(layout, heads, decode.num_tokens, mla)
    return {
        "backend": name, "case": case, "max_abs_err": round(out_err, 5),
        "cache_max_abs_err": cache_err, "ok": out_err < 2e-2 and cache_err == 0.0,
        "decode_us": round(timed(lambda: step(cand, decode, xd, mla)) * 1e6, 1),
        "torch_decode_us": round(timed(lambda: step(ref, decode, xd, mla)) * 1e6, 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--backends", default="triton,flashinfer")
    args = p.parse_args()
    cases = [
        ("llama-3.1-8b-gqa", KVLayout.mha(1, 8, 128, torch.bfloat16), 32, 128**-0.5),
        ("deepseek-v3-mla-tp8", KVLayout.mla(1, 512, 64, torch.bfloat16), 16, 192**-0.5),
    ]
    results, skipped = [], {}
    for name in args.backends.split(","):
        if importlib.util.find_spec(name) is None:
            skipped[name] = f"{name} is not installed"
            print(f"skip {name}: not installed", flush=True)
            continue
        for case, layout, heads, scale in cases:
            try:
                results.append(compare(name, case, layout, heads, scale))
            except Exception as exc:
                results.append({"backend": name, "case": case, "ok": False,
                                "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
            print(results[-1], flush=True)
    ok = bool(results) and all(r["ok"] for r in results)
    print(json.dumps({"ok": ok, "results": results, "skipped": skipped}))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
