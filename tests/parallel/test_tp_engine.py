"""Tensor and expert parallelism against transformers: two real rank processes over gloo.

Greedy tokens equal transformers' and prefill logits agree within 1e-3 at TP 2 for Llama,
Qwen2 and Qwen3 (KV heads split, and shared when there are fewer than ranks), and for
DeepSeek-V3 (MLA + MoE, with and without q_lora) with experts sliced (EP 1) or spread (EP 2),
FP8 block weights read slice by slice; with chunked prefill and prefix-cache hits. After every
case rank 0's page pool (the only allocator: the other ranks hold the same page ids) is whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams
from tests.test_deepseek import VOCAB as DEEPSEEK_VOCAB
from tests.test_deepseek import dequantized_copy
from tests.test_engine_oracle import (
    GREEDY,
    assert_matches_hf,
    assert_pages_released,
    new_llm,
    random_prompts,
)

QWEN_VOCAB = 151936
LENGTHS = [1, 7, 33, 150]

CASES = [
    pytest.param(("llama", "qwen", {}, {}), id="llama"),
    pytest.param(("qwen2", "qwen", {}, {}), id="qwen2"),
    pytest.param(("qwen3", "qwen", {}, {}), id="qwen3"),
    pytest.param(("llama", "qwen", {"kv_heads": 1}, {}), id="llama-1kv-shared"),
    pytest.param(("deepseek_v3", "deepseek", {"layers": 3}, {}), id="v3-ep1"),
    pytest.param(("deepseek_v3", "deepseek", {"layers": 3}, {"ep_size": 2}), id="v3-ep2"),
    pytest.param(
        (
            "deepseek_v3",
            "deepseek",
            {"layers": 3, "config_overrides": {"q_lora_rank": None}},
            {"ep_size": 2},
        ),
        id="v3-no-q-lora-ep2",
    ),
]


@pytest.fixture(scope="module", params=CASES)
def case(request, make_tiny) -> Iterator[tuple[Path, LLM, int]]:
    arch, tokenizer, make_kw, engine_kw = request.param
    path = make_tiny(arch, tokenizer, **make_kw)
    llm = new_llm(path, tp_size=2, dist_timeout_s=30, **engine_kw)
    yield path, llm, DEEPSEEK_VOCAB if tokenizer == "deepseek" else QWEN_VOCAB
    llm.close()


def test_batch_matches_transformers(case) -> None:
    path, llm, vocab = case
    prompts = random_prompts(LENGTHS, vocab, seed=11)
    assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))
    assert_pages_released(llm)


def test_chunked_prefill_and_prefix_hits_match_transformers(case) -> None:
    path, llm, vocab = case
    prefix = random_prompts([70], vocab, seed=12)[0]
    first = [[*prefix, 5, 6, 7]]
    assert_matches_hf(path, first, llm.generate(first, GREEDY))
    second = [[*prefix, 8, 9], [*prefix[:40], 10]]
    outs = llm.generate(second, GREEDY)
    assert all(out.cached_tokens > 0 for out in outs)
    assert_matches_hf(path, second, outs)
    assert_pages_released(llm)


def test_chunked_prefill_at_tp2(make_tiny) -> None:
    path = make_tiny("qwen3", "qwen")
    prompts = random_prompts([90, 31], QWEN_VOCAB, seed=13)
    with new_llm(path, tp_size=2, chunk_size=16, max_batch_tokens=24) as llm:
        assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))
        assert_pages_released(llm)


def test_sampling_sees_the_same_logits_as_one_rank(make_tiny) -> None:
    """Seeded sampling, penalties and logprobs draw from the gathered logits: the same tokens
    and logprobs as one rank."""
    path = make_tiny("llama", "qwen")
    prompts = random_prompts([9, 40], QWEN_VOCAB, seed=14)
    params = SamplingParams(
        temperature=0.8, top_p=0.9, seed=7, max_tokens=10, logprobs=2, presence_penalty=0.5,
        ignore_eos=True,
    )  # fmt: skip
    one = new_llm(path).generate(prompts, params)
    with new_llm(path, tp_size=2) as llm:
        two = llm.generate(prompts, params)
    for a, b in zip(one, two, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_fp8_blocks_load_sliced_per_rank(make_tiny, tmp_path) -> None:
    """16x16 tiles with partial edge tiles: each rank dequantizes only the tiles of its slice."""
    path = make_tiny("deepseek_v3", "deepseek", layers=3, fp8=True, fp8_block=(16, 16))
    prompts = random_prompts([7, 40], DEEPSEEK_VOCAB, seed=5)
    with new_llm(path, tp_size=2, ep_size=2) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert_pages_released(llm)
    assert_matches_hf(dequantized_copy(path, tmp_path / "dequantized"), prompts, outs)
