"""The engine with attention_backend="triton" against transformers: same greedy tokens, prefill
logits within 1e-3, for a tiny Llama (GQA) and a tiny DeepSeek-V3 (MLA), 4-token pages so that
prompts span pages. Chunked prefill (8 tokens, 12 a step) makes steps that mix prefill chunks and
decode rows; a second prompt hits the prefix cache.

Interpreter-only (CPU): a GPU run of this directory leaves the engine's CUDA path to its own tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tokenizer import eos_token_ids, load_tokenizer
from tests.attention.harness import TritonAttention
from tests.e2e.cluster_util import REPO
from tests.test_engine_oracle import (
    GREEDY,
    MAX_NEW,
    assert_matches_hf,
    assert_pages_released,
    hf_reference,
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


def test_generate_command_with_triton_equals_transformers(tiny: Path) -> None:
    """`pdserve generate --attention-backend triton` (the interpreter inherited through the
    environment) prints transformers' greedy tokens, up to EOS if the model says it."""
    prompts = ["Pages of four tokens", "Triton kernels in the interpreter"]
    args = [a for p in prompts for a in ("--prompt", p)]
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", str(tiny), *args,
         "--attention-backend", "triton", "--page-size", "4", "--max-tokens", str(MAX_NEW),
         "--temperature", "0", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    tok = load_tokenizer(tiny)
    eos = set(eos_token_ids(tiny, tok))
    for prompt, line in zip(prompts, done.stdout.splitlines(), strict=True):
        got = json.loads(line)["token_ids"]
        want = hf_reference(str(tiny), tuple(tok(prompt)["input_ids"]))[0]
        assert got and got == want[: len(got)]
        assert len(got) == MAX_NEW or got[-1] in eos
