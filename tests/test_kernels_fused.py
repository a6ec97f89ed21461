"""The fused CPU decode step gives the torch path's tokens and logits, and runs when it should."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.build import cpu_flags
from engine.llm import LLM
from engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif("avx512f" not in cpu_flags(), reason="no AVX-512 on this CPU")

PROMPTS = [[5, 17, 300, 9], list(range(100, 190)), [42, 43], list(range(900, 933))]


@pytest.mark.parametrize(
    "arch, shape",
    [
        ("llama", {}),
        ("qwen2", {}),  # qkv bias
        ("qwen3", {}),  # q/k norms
        ("llama", {"hidden": 128, "heads": 8, "kv_heads": 2}),  # GQA group of 4
        ("qwen3", {"hidden": 64, "heads": 2, "kv_heads": 1, "head_dim": 48}),
    ],
)
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


def test_fused_decode_is_off_where_it_does_not_apply(make_tiny) -> None:
    model = str(make_tiny("llama"))
    assert LLM(model, dtype="float32", cpu_kernels=False).engine.runner.fused_decode is None
    odd = str(make_tiny("llama", hidden=48, heads=4, kv_heads=2))  # head_dim 12
    assert LLM(odd, dtype="float32").engine.runner.fused_decode is None
    assert LLM(odd, dtype="float32").generate([[1, 2, 3]], SamplingParams(max_tokens=3))
