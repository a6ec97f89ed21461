"""MHA KV pages are head-major, as every writer stores them and a transfer reads them.

The engine's K/V of token t, kv head h sits at `k_buffer(layer)[page, h, offset]` (page =
page_table[t // page_size], offset = t % page_size), after a prefill (torch path) and after
decode steps (the fused CPU step where it runs), and heads [a, b) of a page are the one byte range
`page * page_bytes + a * head_page_bytes`, `(b - a) * head_page_bytes` long. The reference is the
first layer's k/v projection computed here from the model's own modules: it depends only on the
token ids and positions, not on the cache.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from engine.engine import Engine
from engine.layers.rotary import apply_rotary
from engine.llm import LLM
from engine.sampling import SamplingParams

PAGE = 4


def first_layer_kv(engine: Engine, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K (rotated) and V of layer 0 for tokens `ids` at positions 0..n-1, [n, kv_heads, dim]."""
    model = engine.runner.model
    attn = model.layers[0].self_attn
    with torch.inference_mode():
        x = model.layers[0].input_layernorm(model.embed_tokens(torch.tensor(ids)))
        _, k, v = attn.qkv_proj.split(attn.qkv_proj(x))
        k, v = (t.reshape(len(ids), attn.kv_heads, attn.head_dim) for t in (k, v))
        cos_sin = model.rotary.cos_sin(torch.arange(len(ids)), k.dtype)
        return apply_rotary(k, *cos_sin), v


def run_one_request(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[list, list]:
    """(the token ids whose KV was computed, the request's page table), stepping by hand: a
    finished request's page table is cleared, so it is kept from the step before."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    req = engine.add_request("r", prompt, params)
    table: list[int] = []
    while engine.has_work():
        engine.step()
        table = list(req.page_table) or table
    return [*prompt, *req.output_ids[:-1]], table  # the last sampled token was never computed


def kv_bytes(ptr: int, start: int, length: int) -> torch.Tensor:
    """`length` bytes at `ptr + start` as float32, read the way a transfer engine reads them."""
    return torch.frombuffer(bytearray(ctypes.string_at(ptr + start, length)), dtype=torch.float32)


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["torch", "native"])
def test_engine_writes_head_major_pages(make_tiny, cpu_kernels: bool) -> None:
    model = make_tiny("llama", heads=4, kv_heads=2)
    llm = LLM(
        str(model),
        dtype="float32",
        page_size=PAGE,
        max_total_tokens=256,
        enable_prefix_cache=False,
        cpu_kernels=cpu_kernels,
    )
    engine = llm.engine
    prompt = [11, 305, 7, 42, 900, 13, 8, 77, 1024, 5]  # 2.5 pages: a partial last page
    ids, table = run_one_request(engine, prompt, max_tokens=7)  # decode crosses 2 pages
    assert len(table) == -(-len(ids) // PAGE) == 4
    want_k, want_v = first_layer_kv(engine, ids)
    pool, kv_heads = engine.pool, want_k.shape[1]
    for buf, want in ((pool.k_buffer(0), want_k), (pool.v_buffer(0), want_v)):
        assert buf.shape[1:] == (kv_heads, PAGE, want.shape[2])
        for t in range(len(ids)):
            page, offset = table[t // PAGE], t % PAGE
            for h in range(kv_heads):
                torch.testing.assert_close(buf[page, h, offset], want[t, h], rtol=1e-5, atol=1e-5)

    head_bytes = pool.layout.head_page_bytes(PAGE)
    (k_ptr, _, page_bytes), (v_ptr, _, _) = pool.buffer_descs()[:2]
    for ptr, want in ((k_ptr, want_k), (v_ptr, want_v)):
        for i, page in enumerate(table):
            filled = min(PAGE, len(ids) - i * PAGE)
            for a, b in ((0, 1), (1, 2), (0, 2)):
                got = kv_bytes(ptr, page * page_bytes + a * head_bytes, (b - a) * head_bytes)
                got = got.view(b - a, PAGE, -1)[:, :filled]
                expect = want[i * PAGE : i * PAGE + filled, a:b].transpose(0, 1)
                torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    if cpu_kernels and engine.runner.fused_decode is None:
        pytest.skip("the torch path passed; the fused CPU decode step does not run here")
