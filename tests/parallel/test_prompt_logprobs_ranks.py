"""Prompt logprobs on two real rank processes over gloo, against transformers: tensor
parallelism (the vocabulary split over the ranks, the LM head's slices gathered for every
reduced row) and DP attention (each rank reduces its own requests' rows, gathered to rank 0).
"""

from __future__ import annotations

from engine.sampling import SamplingParams
from tests.parallel.test_dp_attention import dp_llm
from tests.test_deepseek import VOCAB as DEEPSEEK_VOCAB
from tests.test_engine_oracle import assert_pages_released, new_llm, random_prompts
from tests.test_prompt_logprobs import ASK, assert_prompt_logprobs

QWEN_VOCAB = 151936
PLAIN = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def test_tp2_matches_transformers_across_chunks(make_tiny) -> None:
    """Chunked prefill, a repeated prompt (its prefix cached), and a plain request beside."""
    path = make_tiny("qwen3", "qwen")
    prompts = random_prompts([1, 45, 90], QWEN_VOCAB, seed=31)
    with new_llm(path, tp_size=2, chunk_size=16, max_batch_tokens=40, dist_timeout_s=30) as llm:
        outs = llm.generate([*prompts, prompts[1]], [ASK, ASK, ASK, PLAIN])
        again = llm.generate(prompts[1:2], [ASK])[0]
        assert_pages_released(llm)
    for prompt, out in zip([*prompts, prompts[1]], [*outs[:3], again], strict=True):
        assert_prompt_logprobs(path, prompt, out.prompt_logprobs)
    assert outs[3].prompt_logprobs is None and outs[3].token_ids == outs[1].token_ids


def test_dp_attention_gathers_each_ranks_rows(make_tiny) -> None:
    """Requests on both attention ranks (placed in turn), and steps where only one rank has
    rows (the longer prompt's last chunk)."""
    path = make_tiny("deepseek_v3", "deepseek", layers=3)
    prompts = random_prompts([40, 23, 7], DEEPSEEK_VOCAB, seed=32)
    with dp_llm(path, chunk_size=16, max_batch_tokens=40) as llm:
        outs = llm.generate(prompts, [ASK, ASK, PLAIN])
        assert llm.engine.scheduler.placed == [2, 1]  # the two asking ones on both ranks
        assert_pages_released(llm)
    assert outs[2].prompt_logprobs is None
    for prompt, out in zip(prompts[:2], outs[:2], strict=True):
        assert_prompt_logprobs(path, prompt, out.prompt_logprobs)
