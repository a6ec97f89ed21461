"""The CPU fast paths equal the plain torch ops they replace.

Every native kernel test (they need AVX-512, and say so when they skip) stands beside a test of
the torch path it replaces, run on any CPU: the same inputs through torch's op, or the engine
with `cpu_kernels=False` against transformers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from engine.kv.pool import KVLayout, PagePool
from engine.layers import linear as linear_module
from engine.layers.attention.base import AttentionBatch
from engine.layers.attention.torch_backend import TorchAttention
from engine.layers.linear import SMALL_ROWS, linear
from engine.layers.vocab import VocabEmbedding
from engine.models.base import DecoderOnlyLM
from engine.parallel.group import Parallel
from engine.sampler import argmax_rows


@pytest.mark.parametrize("cols", [7, 255, 256, 257, 1000, 4096 + 63, 151936])
def test_argmax_rows_equals_argmax(cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    for trial in range(12):
        x = torch.randn(5, cols, generator=gen)
        if trial % 3 == 0:
            x = x.round()  # many ties: the first index must win
        if trial % 4 == 1:
            x[:, -1] = x.max() + 1  # the max in the tail past the last whole block
        if trial % 4 == 2:
            x[:, 0] = x.max() + 1
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_argmax_rows_on_a_view() -> None:
    x = torch.randn(8, 3000)[:, 100:2900]
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 17, SMALL_ROWS, SMALL_ROWS + 1, 100])
def test_linear_equals_f_linear(
    dtype: torch.dtype, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 inputs of SMALL_ROWS rows or more go to oneDNN (its calls are counted), within
    float tolerance of `F.linear`; smaller ones and bfloat16 stay on `F.linear` itself."""
    onednn = linear_module._ONEDNN_LINEAR
    takes_onednn = dtype == torch.float32 and rows >= SMALL_ROWS
    if takes_onednn and onednn is None:
        pytest.skip("this torch build has no oneDNN linear op (torch.ops.mkldnn)")
    calls: list[int] = []

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return onednn(x, *args)

    if onednn is not None:
        monkeypatch.setattr(linear_module, "_ONEDNN_LINEAR", counted)
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 64, generator=gen).to(dtype)
    b = torch.randn(300, generator=gen).to(dtype)
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    for bias in (None, b):
        got, want = linear(x, w, bias), F.linear(x, w, bias)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(
            got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-4
        )
    assert calls == ([rows, rows] if takes_onednn else [])


def test_a_changed_kernel_source_builds_a_new_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled-library cache is keyed by the sources' text, so a library built from an
    older source (e.g. for another KV page layout) is never loaded for a newer one."""
    from engine.kernels import build

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    csrc, out = tmp_path / "csrc", tmp_path / "out"
    csrc.mkdir()
    (csrc / "lm_head.h").write_text("")
    source = csrc / "probe.c"
    source.write_text("int probe(void) { return 1; }\n")
    monkeypatch.setattr(build, "CSRC", csrc)
    flags = ("-O0", "-shared", "-fPIC")
    first = build.compile_library("probe", flags, out)
    assert build.compile_library("probe", flags, out) == first  # cached
    source.write_text("int probe(void) { return 2; }\n")
    second = build.compile_library("probe", flags, out)
    assert second != first and ctypes.CDLL(str(second)).probe() == 2


# (heads, kv_heads, head_dim): every shape the native kernel serves also runs on torch's path
ATTENTION_SHAPES = [(4, 2, 8), (4, 2, 16), (8, 1, 64), (3, 3, 128)]
ATTENTION_CASES = [
    pytest.param(
        native, *shape, id=f"{'native' if native else 'torch'}-{'-'.join(map(str, shape))}"
    )
    for shape in ATTENTION_SHAPES
    for native in (False, True)
    if not (native and shape[2] % 16)  # the kernel serves head_dim multiples of 16 only
]


@pytest.mark.parametrize("page", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native, heads, kv_heads, dim", ATTENTION_CASES)
def test_decode_attention_equals_dense_reference(
    dtype: torch.dtype, native: bool, heads: int, kv_heads: int, dim: int, page: int
) -> None:
    """Ragged decode batch over scattered pages == per-request dense softmax attention, on
    torch's path and on the native CPU kernel (which reads the pages in place, prefetching
    pages ahead: page sizes 1 to 16, contexts of one token to several pages)."""
    from engine.kernels.build import cpu_flags
    from engine.kernels.decode_attention import build_decode_attention

    if native and "avx512f" not in cpu_flags():
        pytest.skip("needs AVX-512: this CPU lacks avx512f (the [torch] case runs torch's path)")
    pool = PagePool(KVLayout.mha(1, kv_heads, dim, dtype), 128, page)
    backend = TorchAttention(pool, scale=dim**-0.5)
    if native:
        backend.decode_kernel = build_decode_attention(threads=2)
        assert backend.decode_kernel is not None, "an AVX-512 CPU must get the kernel (gcc?)"
        assert backend.decode_kernel.supports(dtype, heads, kv_heads, dim)  # the kernel runs
    gen = torch.Generator().manual_seed(dim)
    lens = [1 + 5, 13, 2, 9, 40, 1]  # context lengths after this step's token
    tables = [pool.alloc(-(-n // page))[::-1] for n in lens]  # reversed: non-contiguous
    ctx = [torch.randn(2, n, kv_heads, dim, generator=gen).to(dtype) for n in lens]
    k_buf, v_buf = pool.k_buffer(0), pool.v_buffer(0)  # [pages, kv_heads, page, dim]
    for table, (k, v), n in zip(tables, ctx, lens):
        pages = torch.tensor([table[p // page] for p in range(n - 1)], dtype=torch.long)
        offsets = torch.arange(n - 1) % page
        k_buf[pages, :, offsets], v_buf[pages, :, offsets] = k[: n - 1], v[: n - 1]
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    meta = backend.prepare(AttentionBatch([1] * len(lens), lens, tables, page))
    step_k = torch.stack([k[n - 1] for (k, _), n in zip(ctx, lens)])
    step_v = torch.stack([v[n - 1] for (_, v), n in zip(ctx, lens)])
    out = backend.forward(q, step_k, step_v, 0, meta)
    for i, (k, v) in enumerate(ctx):
        kk = k.float().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        vv = v.float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), kk) * dim**-0.5
        want = torch.einsum("hn,nhd->hd", scores.softmax(-1), vv)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out[i].float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("waste", [1.0, 2.0, 100.0])
def test_extend_attention_equals_dense_reference(dtype: torch.dtype, waste: float) -> None:
    """Ragged extends (fresh prompts, chunks after a cached prefix) mixed with decode rows,
    attended in padded groups (or, fresh prompts of one length, in slices of the step's q, k
    and v) == per-request dense causal attention."""
    from engine.layers.attention import torch_backend

    page, heads, kv_heads, dim = 4, 4, 2, 8
    pool = PagePool(KVLayout.mha(1, kv_heads, dim, dtype), 128, page)
    backend = TorchAttention(pool, scale=dim**-0.5)
    gen = torch.Generator().manual_seed(1)
    # (tokens this step, cached before): decode rows have q_len 1
    shapes = [(7, 0), (1, 9), (5, 11), (12, 0), (12, 0), (1, 4), (3, 30)]
    tables = [pool.alloc(-(-(q + c) // page))[::-1] for q, c in shapes]
    k_buf, v_buf = pool.k_buffer(0), pool.v_buffer(0)  # [pages, kv_heads, page, dim]
    ctx = []
    for table, (q_len, cached) in zip(tables, shapes):
        n = q_len + cached
        k, v = (torch.randn(n, kv_heads, dim, generator=gen).to(dtype) for _ in range(2))
        pages = torch.tensor([table[p // page] for p in range(cached)], dtype=torch.long)
        offsets = torch.arange(cached) % page
        k_buf[pages, :, offsets], v_buf[pages, :, offsets] = k[:cached], v[:cached]
        ctx.append((k, v))
    q_lens = [q for q, _ in shapes]
    kv_lens = [q + c for q, c in shapes]
    q = torch.randn(sum(q_lens), heads, dim, generator=gen).to(dtype)
    step_k = torch.cat([k[c:] for (k, _), (_, c) in zip(ctx, shapes)])
    step_v = torch.cat([v[c:] for (_, v), (_, c) in zip(ctx, shapes)])
    meta = backend.prepare(AttentionBatch(q_lens, kv_lens, tables, page))
    meta.extend_groups = torch_backend.group_extends(meta.extends, page, kv_heads, waste)
    if waste == 1.0:
        assert len(meta.extend_groups) > 1  # only equal shapes share a group
        # the two fresh 12-token prompts, one after the other in q, are sliced, not gathered
        fresh = [(g.n, g.q_len) for g in meta.extend_groups if g.first_row is not None]
        assert (2, 12) in fresh
    if waste == 100.0:
        assert len(meta.extend_groups) == 1
    out = backend.forward(q, step_k, step_v, 0, meta)
    row = 0
    for (k, v), q_len, n in zip(ctx, q_lens, kv_lens):
        kk = k.float().repeat_interleave(heads // kv_heads, dim=1)
        vv = v.float().repeat_interleave(heads // kv_heads, dim=1)
        qq = q[row : row + q_len].float()
        scores = torch.einsum("thd,nhd->htn", qq, kk) * dim**-0.5
        visible = torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        want = torch.einsum("htn,nhd->thd", scores.softmax(-1), vv)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out[row : row + q_len].float(), want, rtol=tol, atol=tol)
        row += q_len


class TorchLMHead:
    """What the runner does without the native head: the model's `compute_logits` (float32
    logits of torch's matmul) and the sampler's greedy argmax over them (`argmax_rows`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.model = DecoderOnlyLM()
        embed = VocabEmbedding(*weight.shape, Parallel.single())
        embed.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.model.embed_tokens = embed
        self.model.lm_head = None  # tied: the LM head is the embedding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(x)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        return argmax_rows(self(x))


def _lm_head_reason(weight: torch.Tensor) -> str | None:
    from engine.kernels.lm_head import lm_head_unsupported

    return lm_head_unsupported(weight)


def _lm_head_or_skip(weight: torch.Tensor, threads: int = 1):
    from engine.kernels.lm_head import build_lm_head

    reason = _lm_head_reason(weight)
    if reason is not None and "lacks" in reason:
        pytest.skip(f"needs AVX-512: {reason} (the [torch] case runs torch's path)")
    head = build_lm_head(weight, threads)
    assert head is not None, "a supported CPU must get the native LM head (is gcc installed?)"
    return head


def _lm_head(path: str, weight: torch.Tensor, threads: int):
    return TorchLMHead(weight) if path == "torch" else _lm_head_or_skip(weight, threads)


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_lm_head_equals_matmul(path: str, dtype: torch.dtype, threads: int) -> None:
    gen = torch.Generator().manual_seed(threads)
    vocab, hidden = 1000 + 7, 96  # a vocabulary that is not a multiple of the 16-row block
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.1).to(dtype)
    head = _lm_head(path, weight, threads)
    # torch's bfloat16 matmul rounds the logits to bfloat16; the kernel's stay float32
    tol = 1e-2 if path == "torch" and dtype == torch.bfloat16 else None
    rtol, atol = (tol, tol) if tol else (1e-5, 1e-4)
    for rows in (0, 1, 3, 8, 16, 17, 40):
        x = torch.randn(rows, hidden, generator=gen).to(dtype)
        got = head(x)
        assert got.dtype == torch.float32 and got.shape == (rows, vocab)
        want = x.float() @ weight.float().T
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    x = torch.randn(4, 2 * hidden, generator=gen).to(dtype)[:, ::2]  # a strided view
    torch.testing.assert_close(head(x), x.float() @ weight.float().T, rtol=rtol, atol=atol)


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_lm_head_argmax_equals_argmax_of_its_logits(
    path: str, dtype: torch.dtype, threads: int
) -> None:
    gen = torch.Generator().manual_seed(7 + threads)
    vocab, hidden = 2000 + 5, 64
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.1).to(dtype)
    weight[1500:1510] = weight[3]  # exact ties with an earlier row: the first index must win
    weight[vocab - 1] = weight[0]  # ... and in the last, partial block
    head = _lm_head(path, weight, threads)
    for rows in (0, 1, 5, 16, 23):
        x = torch.randn(rows, hidden, generator=gen).to(dtype)
        if rows > 2:
            x[1] = weight[3] * 50  # row 1's max is the tied row 3
            x[2] = weight[0] * 50  # row 2's max is row 0, tied with the last row
        got = head.argmax(x)
        assert got.dtype == torch.int64 and got.shape == (rows,)
        assert torch.equal(got, head(x).argmax(dim=-1))
        if rows > 2:
            assert got[1].item() == 3 and got[2].item() == 0


def test_cpu_lm_head_declines_what_it_cannot_run() -> None:
    """For its own reasons, which come before any CPU flag (so this runs on any CPU)."""
    from engine.kernels.lm_head import build_lm_head

    odd, half = torch.randn(100, 33), torch.randn(100, 32, dtype=torch.float16)
    assert "not [vocab, even hidden]" in (_lm_head_reason(odd) or "")
    assert "no kernel for torch.float16" in (_lm_head_reason(half) or "")
    assert build_lm_head(odd) is None and build_lm_head(half) is None


def test_cpu_lm_head_rejects_a_wrong_x() -> None:
    with pytest.raises(ValueError, match="expects x"):
        _lm_head_or_skip(torch.randn(100, 32))(torch.randn(2, 31))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_with_and_without_cpu_kernels_agree(make_tiny, dtype: str) -> None:
    """The engine's default (native LM head on CPU) and torch's matmul give the same tokens."""
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    reason = _lm_head_reason(torch.zeros(16, 8, dtype=getattr(torch, dtype)))
    if reason is not None:
        pytest.skip(f"needs AVX-512: {reason} (see test_engine_without_cpu_kernels_*)")
    model = make_tiny("llama")
    prompts = [[5, 17, 300, 9], list(range(100, 160)), [42]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    runs = {}
    for native in (True, False):
        llm = LLM(str(model), dtype=dtype, cpu_kernels=native, keep_logits=True)
        kernel = llm.engine.runner.lm_head_kernel
        assert (kernel is not None) == native, "a supported CPU must get the native LM head (gcc?)"
        runs[native] = llm.generate(prompts, params)
    for fast, plain in zip(runs[True], runs[False], strict=True):
        if dtype == "bfloat16":
            # torch's bfloat16 matmul rounds logits to bfloat16 (the kernel's stay float32), so
            # near-ties may pick differently later on: compare the first step's logits only
            torch.testing.assert_close(fast.logits[0], plain.logits[0], rtol=2e-2, atol=2e-2)
            continue
        assert fast.token_ids == plain.token_ids
        for a, b in zip(fast.logits, plain.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_malloc_tuning_takes_on_glibc() -> None:
    import platform

    from engine.kernels.build import keep_freed_memory_mapped

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory_mapped() is True


def test_greedy_steps_take_the_kernels_argmax_and_match_the_sampler(make_tiny) -> None:
    """Plain greedy steps skip the logits (the kernel's argmax); the tokens equal the full
    sampler's, also when a request with logprobs shares the batch (that step takes the
    sampler)."""
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    reason = _lm_head_reason(torch.zeros(16, 8))
    if reason is not None:
        pytest.skip(f"needs AVX-512: {reason} (see test_engine_without_cpu_kernels_*)")
    model = str(make_tiny("llama"))
    prompts = [[5, 17, 300, 9], list(range(100, 160)), [42], list(range(900, 903))]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    mixed = [greedy, with_logprobs, greedy, greedy]
    fast = LLM(model, dtype="float32")
    calls = []
    kernel = fast.engine.runner.lm_head_kernel
    original = kernel.argmax
    kernel.argmax = lambda x, allowed=None: calls.append(x.shape[0]) or original(x, allowed)
    plain = LLM(model, dtype="float32", cpu_kernels=False)
    for params in (greedy, mixed):
        calls.clear()
        got = [o.token_ids for o in fast.generate(prompts, params)]
        assert got == [o.token_ids for o in plain.generate(prompts, params)]
        if params is greedy:
            assert sum(calls) == len(prompts) * greedy.max_tokens  # every token came from it
        else:
            assert sum(calls) < len(prompts) * greedy.max_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_engine_without_cpu_kernels_matches_transformers(make_tiny, arch: str) -> None:
    """The torch path beside the engine-level kernel tests above, on any CPU: with
    `cpu_kernels=False` nothing native is built, and the greedy tokens and prompt logits are
    transformers', also when a request with logprobs shares the batch."""
    from tests.test_engine_oracle import GREEDY, assert_matches_hf, new_llm

    model = make_tiny(arch)
    prompts = [[5, 17, 300, 9], list(range(100, 160)), [42], list(range(900, 903))]
    llm = new_llm(model, cpu_kernels=False)
    runner = llm.engine.runner
    assert runner.lm_head_kernel is None and runner.fused_decode is None
    assert runner.attention.decode_kernel is None
    assert_matches_hf(model, prompts, llm.generate(prompts, GREEDY))
    with_logprobs = dataclasses.replace(GREEDY, logprobs=1)
    mixed = [GREEDY, with_logprobs, GREEDY, GREEDY]
    assert_matches_hf(model, prompts, llm.generate(prompts, mixed))
