"""The engine with attention_backend="triton" against transformers: same greedy tokens, prefill
logits within 1e-3, for a tiny Llama (GQA) and a tiny DeepSeek-V3 (MLA), 4-token pages so that
prompts span pages. Chunked prefill (8 tokens, 12 a step) makes steps that mix prefill chunks and
decode rows; a second prompt hits the prefix cache.

Interpreter-only (CPU): a GPU run of this directory leaves the engine's CUDA path to its own tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.attention.harness import TritonAttention
from tests.test_engine_oracle import (
    GREEDY,
    assert_matches_hf,
    assert_pages_released,
    new_llm,
    random_prompts,
)

VOCAB = 129280  # the tiny DeepSeek's; Qwen's tokenizer is larger, so Llama takes it too


@pytest.fixture(params=["llama", "deepseek_v3"])
def tiny(request, make_tiny, device: str) -> Path:
    if device != "cpu":
        pytest.skip("the oracle runs the engine on CPU under the interpreter")
    if request.param == "llama":
        return make_tiny("llama")
    return make_tiny("deepseek_v3", "deepseek", layers=2)


def test_triton_backend_matches_transformers(tiny: Path) -> None:
    llm = new_llm(tiny, attention_backend="triton", page_size=4, chunk_size=8, max_batch_tokens=12)
    runner = llm.engine.runner
    assert isinstance(runner.attention, TritonAttention)
    assert runner.fused_decode is None  # the native fused decode would bypass the backend
    prompts = random_prompts([3, 9, 14], VOCAB)
    outs = llm.generate(prompts, GREEDY)
    assert_matches_hf(tiny, prompts, outs)
    shared = prompts[2] + random_prompts([6], VOCAB, seed=1)[0]  # a prefix hit: extend 6 on 12
    again = llm.generate([shared], GREEDY)
    assert_matches_hf(tiny, [shared], again)
    assert again[0].cached_tokens >= 12
    assert_pages_released(llm)
