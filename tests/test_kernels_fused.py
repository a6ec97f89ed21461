"""The fused CPU decode step gives the torch path's tokens and logits, and runs when it should.

The fused step needs AVX-512; the torch path it replaces is tested against transformers on the
same models and schedule on any CPU (`test_torch_decode_path_matches_transformers`).
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import decode_layer
from engine.kernels.build import cpu_flags
from engine.llm import LLM
from engine.sampling import SamplingParams
from tests.test_engine_oracle import GREEDY, assert_matches_hf, new_llm

needs_avx512 = pytest.mark.skipif(
    "avx512f" not in cpu_flags(),
    reason="needs AVX-512: this CPU lacks avx512f (the torch path's test still runs)",
)

DTYPES = ("bfloat16", "float32")
PROMPTS = [[5, 17, 300, 9], list(range(100, 190)), [42, 43], list(range(900, 933))]
SHAPES = [
    ("llama", {}),
    ("qwen2", {}),  # qkv bias
    ("qwen3", {}),  # q/k norms
    ("llama", {"hidden": 128, "heads": 8, "kv_heads": 2}),  # GQA group of 4
    ("qwen3", {"hidden": 64, "heads": 2, "kv_heads": 1, "head_dim": 48}),
]


@pytest.mark.parametrize("arch, shape", SHAPES)
def test_torch_decode_path_matches_transformers(make_tiny, arch: str, shape: dict) -> None:
    """What the fused step replaces, on any CPU: with `cpu_kernels=False` and the fused test's
    schedule (prefill chunks mixed with decode rows, then pure decode steps), the greedy tokens
    and prompt logits are transformers'."""
    model = make_tiny(arch, **shape)
    llm = new_llm(model, cpu_kernels=False, max_batch_tokens=48)
    assert llm.engine.runner.fused_decode is None
    assert_matches_hf(model, PROMPTS, llm.generate(PROMPTS, GREEDY))
    llm.engine.check_integrity()


def test_torch_decode_path_in_bfloat16_stays_near_float32(make_tiny) -> None:
    """What the bfloat16 fused test compares against, on any CPU: the torch path of a bfloat16
    model stays within bfloat16 noise of a float32 run of the same checkpoint, over the steps
    where the two agree on tokens (measured here: at most 0.58 apart, 0.1 on average)."""
    model = str(make_tiny("qwen2"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = [
        LLM(model, dtype=dtype, cpu_kernels=False, keep_logits=True, page_size=4).generate(
            PROMPTS, params
        )
        for dtype in ("bfloat16", "float32")
    ]
    for half, ref in zip(*runs, strict=True):
        for step, want in enumerate(ref.logits):
            error = (half.logits[step] - want).abs()
            assert float(error.max()) < 1.0 and float(error.mean()) < 0.2, (step, error.max())
            if half.token_ids[step] != ref.token_ids[step]:
                break


@needs_avx512
@pytest.mark.parametrize("arch, shape", SHAPES)
def test_fused_decode_equals_torch_path(make_tiny, arch: str, shape: dict) -> None:
    model = str(make_tiny(arch, **shape))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    # a small token budget chunks the long prompt: early steps mix prefill chunks and decode
    # rows (torch's path), later ones are decode only (the fused call)
    opts = dict(dtype="float32", keep_logits=True, max_batch_tokens=48, page_size=4)
    fused_llm = LLM(model, **opts)
    fused = fused_llm.engine.runner.fused_decode
    assert fused is not None
    calls = []
    original = fused.__call__
    fused_llm.engine.runner.fused_decode = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    got = fused_llm.generate(PROMPTS, params)
    want = LLM(model, cpu_kernels=False, **opts).generate(PROMPTS, params)
    assert calls and max(calls) == len(PROMPTS)
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    fused_llm.engine.check_integrity()


@needs_avx512
def test_fused_decode_in_bfloat16_is_at_least_as_close_to_float32(make_tiny) -> None:
    """A bfloat16 model's fused step computes in float32 where the torch path rounds every
    activation to bfloat16: its logits stay within bfloat16 noise of a float32 run of the same
    checkpoint, and over the steps where all three runs agree on tokens they are on the whole
    no further from it than the torch path's."""
    model = str(make_tiny("qwen2"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = {}
    for name, opts in {
        "fused": dict(dtype="bfloat16"),
        "torch": dict(dtype="bfloat16", cpu_kernels=False),
        "fp32": dict(dtype="float32", cpu_kernels=False),
    }.items():
        llm = LLM(model, keep_logits=True, page_size=4, **opts)
        assert (llm.engine.runner.fused_decode is not None) == (name == "fused")
        runs[name] = llm.generate(PROMPTS, params)
    errors = {"fused": 0.0, "torch": 0.0}
    for fused, plain, ref in zip(runs["fused"], runs["torch"], runs["fp32"], strict=True):
        for step, want in enumerate(ref.logits):
            for name, out in (("fused", fused), ("torch", plain)):
                errors[name] += float((out.logits[step] - want).abs().mean())
            assert float((fused.logits[step] - want).abs().max()) < 0.5
            same = ref.token_ids[step] == fused.token_ids[step] == plain.token_ids[step]
            if not same:
                break
    assert errors["fused"] <= 1.1 * errors["torch"], errors


@needs_avx512
def test_fused_decode_is_off_where_it_does_not_apply(make_tiny) -> None:
    model = str(make_tiny("llama"))
    assert LLM(model, dtype="float32", cpu_kernels=False).engine.runner.fused_decode is None
    odd = str(make_tiny("llama", hidden=48, heads=4, kv_heads=2))  # head_dim 12
    assert LLM(odd, dtype="float32").engine.runner.fused_decode is None
    assert LLM(odd, dtype="float32").generate([[1, 2, 3]], SamplingParams(max_tokens=3))


def test_bfloat16_weights_take_the_fused_step_only_while_their_float32_copy_is_small(
    make_tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its float32 copy doubles what a bfloat16 model's step reads: past BF16_MAX_BYTES torch's
    bfloat16 GEMMs win (a 12-layer, hidden-1024 model: 38 ms a step against 53), while a
    float32 model of the same size keeps it (MAX_BYTES)."""
    model = str(make_tiny("llama"))
    runners = {d: LLM(model, dtype=d, cpu_kernels=False).engine.runner for d in DTYPES}
    size = sum(p.numel() * 4 for p in runners["bfloat16"].model.layers.parameters())
    monkeypatch.setattr(decode_layer, "BF16_MAX_BYTES", size - 1)
    reason = decode_layer.fused_decode_unsupported(
        runners["bfloat16"].model, runners["bfloat16"].pool
    )
    assert reason is not None and "for bfloat16 weights" in reason
    fp32 = decode_layer.fused_decode_unsupported(runners["float32"].model, runners["float32"].pool)
    assert fp32 is None or "avx512f" in fp32
    monkeypatch.setattr(decode_layer, "BF16_MAX_BYTES", size)
    bf16 = decode_layer.fused_decode_unsupported(
        runners["bfloat16"].model, runners["bfloat16"].pool
    )
    assert bf16 is None or "avx512f" in bf16
