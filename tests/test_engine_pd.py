"""The engine's PD hooks, two engines in one process: a prefill engine computes the prompt and
parks its pages, the pages are copied into pages a decode engine reserved, and decoding goes on
there. (Moving bytes between processes is the transfer layer's job and is tested there; here
the copy is a tensor copy.) Greedy output must equal transformers' and every page must come back.
"""

from __future__ import annotations

import pytest
import torch

from engine.llm import Completion
from engine.sampling import SamplingParams
from tests.test_engine_oracle import (
    GREEDY,
    assert_matches_hf,
    assert_pages_released,
    new_llm,
    random_prompts,
)


def copy_pages(src_pool, src_pages, dst_pool, dst_pages) -> None:
    src, dst = torch.tensor(src_pages), torch.tensor(dst_pages)
    for a, b in zip(src_pool.buffers(), dst_pool.buffers(), strict=True):
        b[dst] = a[src]


def run_pd(prefill, decode, prompts, params) -> list[Completion]:
    results = {}
    for i, prompt in enumerate(prompts):
        rid = f"pd{i}"
        prefill.add_request(rid, prompt, params, prefill_only=True)
        assert decode.reserve(rid, prompt, params, headroom=8) is not None
        results[rid] = Completion(prompt)
    while prefill.has_work():
        for out in prefill.step():
            assert out.finished and len(out.new_token_ids) == 1
            copy_pages(
                prefill.pool, prefill.kv_pages(out.rid), decode.pool, decode.kv_pages(out.rid)
            )
            prefill.release(out.rid)
            first = out.new_token_ids[0]
            lp = out.logprobs[0] if out.logprobs else None
            top = out.top_logprobs[0] if out.top_logprobs else ()
            if out.logits is not None:
                results[out.rid].logits.append(out.logits)  # the prefill node's logits
            results[out.rid].add(decode.activate(out.rid, first, lp, top, out.cached_tokens))
            prefill.check_integrity()
            decode.check_integrity()
    while decode.has_work():
        for out in decode.step():
            results[out.rid].add(out)
    return list(results.values())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prefill_then_decode_matches_transformers(make_tiny, arch) -> None:
    path = make_tiny(arch)
    prefill, decode = new_llm(path, chunk_size=40), new_llm(path, enable_prefix_cache=False)
    prompts = random_prompts([1, 9, 16, 17, 100, 257], len(prefill.tokenizer), seed=7)
    outs = run_pd(prefill.engine, decode.engine, prompts, GREEDY)
    assert_matches_hf(path, prompts, outs)
    assert_pages_released(prefill)
    assert_pages_released(decode)


def test_seeded_sampling_continues_across_nodes(make_tiny) -> None:
    path = make_tiny("llama")
    params = SamplingParams(temperature=0.8, top_k=50, seed=7, max_tokens=10, ignore_eos=True)
    prompts = random_prompts([20, 33], 150_000, seed=8)
    single = new_llm(path).generate(prompts, params)
    prefill, decode = new_llm(path), new_llm(path)
    pd = run_pd(prefill.engine, decode.engine, prompts, params)
    assert [o.token_ids for o in pd] == [o.token_ids for o in single]
    assert [o.text for o in pd] == [o.text for o in single]


def test_logit_bias_holds_on_both_nodes(make_tiny) -> None:
    """Prefill draws the first token and decode the rest, each under the request's bias."""
    path = make_tiny("llama")
    prompts = random_prompts([12], 150_000, seed=9)
    forced = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={"777": 100})
    prefill, decode = new_llm(path), new_llm(path)
    pd = run_pd(prefill.engine, decode.engine, prompts, forced)
    assert pd[0].token_ids == [777] * 5
    assert_pages_released(prefill)
    assert_pages_released(decode)


def test_prefill_cache_hit_counts_and_reservation_limits(make_tiny) -> None:
    path = make_tiny("llama")
    prefill = new_llm(path)
    decode = new_llm(path, max_total_tokens=64, page_size=4)  # 16 pages
    prompt = random_prompts([40], 150_000, seed=9)[0]
    first = run_pd(prefill.engine, decode.engine, [prompt], GREEDY)[0]
    again = run_pd(prefill.engine, decode.engine, [prompt], GREEDY)[0]
    assert first.token_ids == again.token_ids
    assert first.cached_tokens == 0 and again.cached_tokens >= 36
    engine = decode.engine
    engine.flush_cache()
    with pytest.raises(ValueError, match="KV pages but the pool holds 16"):
        engine.reserve("never", list(range(70)), GREEDY)
    first_pages = engine.reserve("a", list(range(30)), GREEDY, headroom=10)  # 10 pages
    assert first_pages is not None and len(first_pages) == 8  # 30 prompt tokens in 8 pages
    assert engine.reserve("b", list(range(30)), GREEDY, headroom=4) is None  # never overcommits
    assert engine.pool.num_free == 6
    assert engine.reserve("b", list(range(12)), GREEDY, headroom=4) is not None
    engine.release("a")
    engine.release("b")
    assert_pages_released(decode)
