"""The triton backend's static decode tables (what a CUDA graph replays) equal its eager path.

A decode step of b requests through `StaticDecode`, padded to a bucket of B > b rows, gives
exactly the eager path's outputs for the real rows and the same KV writes; the padding rows
write only the reserved page 0. Then the whole engine, its decode steps run through the static
tensors without capture (engine/cuda_graph.py's capture=False), returns transformers' greedy
tokens. Runs in Triton's interpreter on CPU (the kernel part compiled on a GPU too).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.cuda_graph import graph_buckets
from engine.kv.pool import RESERVED_PAGE, KVLayout, PagePool
from engine.layers.attention.base import AttentionBatch
from engine.llm import LLM
from tests.attention.harness import SMALL, TritonAttention, TritonBlocks, randn, step_batch
from tests.test_engine_oracle import (
    GREEDY,
    assert_matches_hf,
    assert_pages_released,
    hf_reference,
    random_prompts,
)

PAGE = 4
MAX_PAGES = 10
"""40 keys at most. SMALL's 16-key splits cut that 3 ways, and FIRST's longest context too:
the static and the eager path then split alike, so their outputs are bit-equal."""
FIRST = [(1, 36), (1, 4), (1, 21)]  # (new, cached): contexts of 37, 5 and 22 keys
SECOND = [(1, 33), (1, 0)]  # a later, smaller step in the same tables: older rows stay behind
ONE_SPLIT = TritonBlocks(extend_m=16, extend_n=16, decode_n=16)  # 256-key splits: one here

Attend = Callable[[TritonAttention, Any, int, int, int], torch.Tensor]
"""(backend, meta, real rows, rows, seed) -> the layer's output for `rows` token rows, the first
`real` rows the same whatever `rows`."""


def token_rows(real: int, rows: int, shape: tuple[int, ...], dtype, device, seed: int):
    """`real` rows drawn from `seed`, then padding rows up to `rows` from another draw."""
    head = randn(real, *shape, dtype=dtype, device=device, seed=seed)
    tail = randn(rows - real, *shape, dtype=dtype, device=device, seed=seed + 100)
    return torch.cat([head, tail])


def mha(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str) -> Attend:
    def attend(backend: TritonAttention, meta: Any, real: int, rows: int, seed: int):
        q = token_rows(real, rows, (heads, dim), dtype, device, seed)
        kv = token_rows(real, rows, (2 * kv_heads, dim), dtype, device, seed + 1)
        return backend.forward(q, kv[:, :kv_heads], kv[:, kv_heads:], 0, meta)

    return attend


def mla(heads: int, rank: int, rope: int, dtype: torch.dtype, device: str) -> Attend:
    def attend(backend: TritonAttention, meta: Any, real: int, rows: int, seed: int):
        q = token_rows(real, rows, (heads, rank + rope), dtype, device, seed)
        kv = token_rows(real, rows, (rank + rope,), dtype, device, seed + 1)
        q_latent, q_rope = q[..., :rank], q[..., rank:]
        return backend.forward_mla(q_latent, q_rope, kv[:, :rank], kv[:, rank:], 0, meta)

    return attend


def twin_backends(layout: KVLayout, device: str, blocks: TritonBlocks) -> list[TritonAttention]:
    """Two triton backends over pools holding the same random bytes."""
    pools = [PagePool(layout, 24, PAGE, device) for _ in range(2)]
    gen = torch.Generator().manual_seed(11)
    for a, b in zip(*(p.buffers() for p in pools)):
        a.copy_(torch.randn(a.shape, generator=gen).to(layout.dtype))
        b.copy_(a)
    width = layout.head_dim if layout.kind == "mha" else layout.latent_dim
    return [TritonAttention(pool, width**-0.5, blocks) for pool in pools]


def assert_pools_equal_but_padding(eager: TritonAttention, static: TritonAttention) -> None:
    """Same bytes in every page but the reserved one (the padding rows' scratch)."""
    for i, (a, b) in enumerate(zip(eager.pool.buffers(), static.pool.buffers())):
        assert torch.equal(a[RESERVED_PAGE + 1 :], b[RESERVED_PAGE + 1 :]), f"buffer {i} differs"


def check_static_equals_eager(
    layout: KVLayout, attend: Attend, device: str, blocks: TritonBlocks = SMALL
) -> None:
    """FIRST then SECOND, each eager and through the static tables padded to a bucket of 4;
    then a step of padding rows only (what a capture runs), which writes page 0 alone."""
    eager, static = twin_backends(layout, device, blocks)
    tables = static.static_decode(max_batch=8, max_pages=MAX_PAGES)
    assert tables.num_splits == blocks.num_splits(37)  # FIRST's longest context
    for step, shapes in enumerate([FIRST, SECOND]):
        batch = step_batch(shapes, PAGE)
        real = batch.num_tokens
        assert tables.fits(batch)
        want = attend(eager, eager.prepare(batch), real, real, 10 * step)
        got = attend(static, tables.fill(batch, 4), real, 4, 10 * step)
        assert torch.equal(got[:real], want), f"step {step}: outputs differ from eager"
        assert_pools_equal_but_padding(eager, static)
    attend(static, tables.fill(AttentionBatch([], [], [], PAGE), 2), 0, 2, 99)
    assert_pools_equal_but_padding(eager, static)
    assert tables.meta(4) is tables.meta(4)  # one set of tensors per bucket: what a graph keeps


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dtype", "blocks"),
    [
        (4, 4, torch.float32, SMALL),
        (8, 2, torch.bfloat16, SMALL),
        (8, 2, torch.float32, ONE_SPLIT),
    ],
    ids=["mha-fp32", "gqa-bf16", "gqa-one-split"],
)
def test_static_decode_equals_eager_mha(
    heads: int, kv_heads: int, dtype: torch.dtype, blocks: TritonBlocks, device: str
) -> None:
    layout = KVLayout.mha(1, kv_heads, 16, dtype)
    check_static_equals_eager(layout, mha(heads, kv_heads, 16, dtype, device), device, blocks)


def test_static_decode_equals_eager_mla(device: str) -> None:
    layout = KVLayout.mla(1, 32, 16, torch.bfloat16)
    check_static_equals_eager(layout, mla(4, 32, 16, torch.bfloat16, device), device)


def test_static_tables_take_decode_steps_only(device: str) -> None:
    """Extend rows, a context wider than the tables, or more rows than they hold run eager."""
    layout = KVLayout.mha(1, 2, 16, torch.float32)
    tables = twin_backends(layout, device, SMALL)[0].static_decode(2, MAX_PAGES)
    assert not tables.fits(step_batch([(2, 3)], PAGE))
    assert not tables.fits(step_batch([(1, 4 * MAX_PAGES)], PAGE))
    assert not tables.fits(step_batch([(1, 1)] * 3, PAGE))
    with pytest.raises(ValueError, match="run this step eager"):
        tables.fill(step_batch([(2, 3)], PAGE), 2)


def test_graph_buckets() -> None:
    assert graph_buckets(1) == [1]
    assert graph_buckets(3) == [1, 2, 3]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_buckets(100)[-4:] == [64, 80, 96, 100]
    assert graph_buckets(256)[-2:] == [240, 256]


@pytest.mark.parametrize("keep_logits", [True, False], ids=["logits", "argmax"])
def test_engine_through_static_tables_equals_transformers(
    make_tiny, device: str, keep_logits: bool
) -> None:
    """Decode steps of 1 to 4 requests (buckets 1, 2 and 4: a step of 3 pads) through the
    static tables: transformers' greedy tokens, whether the step returns logits or greedy ids."""
    if device != "cpu":
        pytest.skip("runs the engine on CPU under the interpreter (tests/gpu: the CUDA graphs)")
    path: Path = make_tiny("llama")
    llm = LLM(
        str(path),
        dtype="float32",
        keep_logits=keep_logits,
        attention_backend="triton",
        page_size=4,
        max_total_tokens=8192,
        max_running=4,
        max_model_len=256,
        chunk_size=8,
        max_batch_tokens=12,
    )
    runner = llm.engine.runner
    assert runner.decode_graphs is None  # on CPU: eager unless asked
    runner.use_decode_graphs(capture=False)
    graphs = runner.decode_graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4]
    prompts = random_prompts([3, 9, 14, 1], 129280)
    outs = llm.generate(prompts, GREEDY)
    if keep_logits:
        assert_matches_hf(path, prompts, outs)
    else:
        for prompt, out in zip(prompts, outs, strict=True):
            assert out.token_ids == hf_reference(str(path), tuple(prompt))[0]
    assert graphs.replays >= GREEDY.max_tokens - 1
    assert_pages_released(llm)
