"""Compile every Triton kernel for a GPU at real model shapes, on a machine with no GPU.

Triton's interpreter (how CI checks the kernels' math) accepts what a GPU refuses: a tile that
needs more shared memory than a block may have, more registers than a launch may use. This
script runs the real launch code over CPU tensors of real layer shapes (the `triton` attention
backend's prepare and forward, `fused_moe`, each picking its own tiles) with Triton's driver
swapped for one that compiles for the target and launches nothing
(engine/kernels/triton/compile_only.py), and checks each kernel as the CUDA runtime would when
it loads it:

- Llama-3.1-8B's GQA layer (32 query heads, 8 KV heads, head_dim 128), 64- and 16-token pages;
- DeepSeek-V3's MLA (latent 512 + rope 64) at TP 8 (16 heads) and TP 1 (128 heads);
- DeepSeek-V3's routed experts (hidden 7168, intermediate 2048 at TP 1 and 256 at TP 8, top-8
  of 256), bf16 and FP8 with 128x128 block scales, at decode and prefill pair counts;

each step mixing decodes with long contexts (split KV, merged) and prefill chunks over a cached
prefix, plus a decode-only step with short contexts (one split, no merge).

    python scripts/gpu_compile.py [--arch 90] [--dtypes bfloat16 float16] [--quick]

A line per compiled kernel, then a JSON summary as the last line; exit 1 where one is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are defined: compile, never interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton

from engine.kernels.triton.compile_only import CompileOnlyDriver, KernelReport
from engine.kernels.triton_moe import BlockFp8, fused_moe, pick_blocks
from engine.kv.pool import KVLayout, PagePool
from engine.layers.attention.base import AttentionBatch
from engine.layers.attention.triton_backend import TritonAttention, TritonBlocks

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
"""Bytes of shared memory one block may opt in to (CUDA's sharedMemPerBlockOptin)."""
FP8_ARCH = 89
"""Triton reads float8_e4m3fn from sm_89 on; older GPUs dequantize FP8 experts at load."""
MIXED = [(3999, 1), (1499, 1), (63, 1), (512, 128), (0, 200)]  # (cached, new) per request
SHORT = [(40, 1), (9, 1)]
Launch = tuple[str, Callable[[], None]]


def attention_step(
    layout: KVLayout,
    heads: int,
    page: int,
    reqs: list[tuple[int, int]],
    dtype: torch.dtype,
    blocks: TritonBlocks | None = None,
) -> None:
    """One layer's forward of a step of `reqs` through the triton backend (its own tiles unless
    `blocks`), over a pool just big enough (pages handed out in order)."""
    pages = [math.ceil((c + n) / page) for c, n in reqs]
    pool = PagePool(layout, sum(pages), page, "cpu")
    tables, first = [], 1
    for count in pages:
        tables.append(list(range(first, first + count)))
        first += count
    batch = AttentionBatch([n for _, n in reqs], [c + n for c, n in reqs], tables, page)
    backend = TritonAttention(pool, scale=0.1, blocks=blocks)
    meta = backend.prepare(batch)
    tokens = batch.num_tokens
    if layout.kind == "mla":
        q = torch.zeros(tokens, heads, layout.kv_lora_rank, dtype=dtype)
        q_rope = torch.zeros(tokens, heads, layout.rope_dim, dtype=dtype)
        latent = torch.zeros(tokens, layout.kv_lora_rank, dtype=dtype)
        k_rope = torch.zeros(tokens, layout.rope_dim, dtype=dtype)
        backend.forward_mla(q, q_rope, latent, k_rope, 0, meta)
    else:
        q = torch.zeros(tokens, heads, layout.head_dim, dtype=dtype)
        kv = torch.zeros(tokens, layout.num_kv_heads, layout.head_dim, dtype=dtype)
        backend.forward(q, kv, kv, 0, meta)


def moe_step(tokens: int, inter: int, dtype: torch.dtype, fp8: bool) -> None:
    """DeepSeek-V3's routed experts over `tokens` tokens (8 experts held, tiles picked as for
    its 256: the count of experts only moves runtime values, never a kernel's constants)."""
    hidden, experts, top_k, block = 7168, 8, 8, (128, 128)
    shapes = ((experts, 2 * inter, hidden), (experts, hidden, inter))
    if fp8:
        halves = (2, 1)
        gate_up, down = (
            BlockFp8(
                torch.zeros(s, dtype=torch.float8_e4m3fn),
                torch.ones(s[0], h * math.ceil(s[1] / h / 128), math.ceil(s[2] / 128)),
                block,
                halves=h,
            )
            for s, h in zip(shapes, halves, strict=True)
        )
    else:
        gate_up, down = (torch.zeros(s, dtype=dtype) for s in shapes)
    ids = torch.arange(tokens * top_k).remainder(experts).view(tokens, top_k)
    weights = torch.full((tokens, top_k), 1 / top_k)
    blocks = pick_blocks(tokens * top_k, 256, block if fp8 else None)
    fused_moe(torch.zeros(tokens, hidden, dtype=dtype), gate_up, down, weights, ids, blocks)


def launches(dtypes: list[torch.dtype], quick: bool, arch: int) -> Iterator[Launch]:
    fp8s = (False, True) if arch >= FP8_ARCH else (False,)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for page in (64,) if quick else (64, 16):
            gqa = KVLayout.mha(1, 8, 128, dtype)
            for label, reqs in (("mixed", MIXED), ("short decode", SHORT)):
                case = f"llama-3.1-8b {name} page {page} {label}"
                yield case, partial(attention_step, gqa, 32, page, reqs, dtype)
        mla = KVLayout.mla(1, 512, 64, dtype)
        for heads in (16,) if quick else (16, 128):
            for label, reqs in (("mixed", MIXED), ("short decode", SHORT)):
                case = f"deepseek-v3 mla {name} {heads} heads {label}"
                yield case, partial(attention_step, mla, heads, 64, reqs, dtype)
        for fp8 in fp8s:
            for inter in (256,) if quick else (256, 2048):
                for tokens in (64, 2048):
                    weights = "fp8 weights" if fp8 else "weights"
                    case = f"deepseek-v3 moe {name} {weights} I={inter} {tokens} tokens"
                    yield case, partial(moe_step, tokens, inter, dtype, fp8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="one page size, TP 8 shapes only")
    parser.add_argument(
        "--probe-refusal",
        action="store_true",
        help="also compile a tile past the limit (MLA decode over 256 keys a step), reported "
        "under 'probe' and not counted as refused: the check itself can fail",
    )
    args = parser.parse_args()
    dtypes = [getattr(torch, name) for name in args.dtypes]
    driver = CompileOnlyDriver(args.arch, SHARED_LIMIT[args.arch])
    reports: list[KernelReport] = []
    with driver.active():
        for case, launch in launches(dtypes, args.quick, args.arch):
            for report in driver.run(case, launch):
                print(report.line(), flush=True)
                reports.append(report)
    summary = {
        "arch": f"sm_{args.arch}",
        "triton": triton.__version__,
        "kernels": len(reports),
        "refused": [f"{r.case}: {r.kernel}: {r.error}" for r in reports if r.error],
        "spilling": [f"{r.case}: {r.kernel}" for r in reports if r.spilled],
        "max_shared": max((r.shared for r in reports), default=0),
        "shared_limit": SHARED_LIMIT[args.arch],
        "max_registers": max((r.registers for r in reports), default=0),
        "compiled": [dataclasses.asdict(r) for r in reports],
    }
    if args.probe_refusal:
        with driver.active():
            mla = KVLayout.mla(1, 512, 64, dtypes[0])
            too_big = partial(
                attention_step, mla, 16, 64, SHORT, dtypes[0], TritonBlocks(decode_n=256)
            )
            summary["probe"] = [r.error for r in driver.run("probe", too_big)]
    print(json.dumps(summary))
    return 1 if summary["refused"] or not reports else 0


if __name__ == "__main__":
    sys.exit(main())
