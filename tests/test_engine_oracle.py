"""The engine against transformers (fp32, eager attention): same greedy tokens, same logits.

Covers plain batches, chunked prefill, prefix-cache hits and requests arriving mid-decode.
After every case the page pool's integrity holds and no page stays held by a request.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

import pytest
import torch

from engine.llm import LLM
from engine.sampling import SamplingParams

ARCHS = ["llama", "qwen2", "qwen3"]
MAX_NEW = 12
LENGTHS = [1, 2, 7, 16, 33, 64, 150, 300]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@cache
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    model.generation_config.eos_token_id = None  # compare whole runs; EOS is ignored below too
    return model.eval()


@cache
def hf_reference(path: str, prompt: tuple[int, ...]) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and the prompt's last-position logits."""
    model = _hf_model(path)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False
        )
        logits = model(ids).logits[0, -1].float()
    return out[0, len(prompt) :].tolist(), logits


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def assert_matches_hf(path: Path, prompts: list[list[int]], outs) -> None:
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, logits = hf_reference(str(path), tuple(prompt))
        assert out.token_ids == tokens, f"prompt of {len(prompt)} tokens diverged"
        diff = (out.logits[0] - logits).abs().max().item()
        assert diff < 1e-3, f"prefill logits differ by {diff} for a {len(prompt)}-token prompt"


def assert_pages_released(llm: LLM) -> None:
    engine = llm.engine
    engine.check_integrity()
    assert not engine.has_work()
    assert engine.num_free_pages == engine.total_pages
    assert engine.flush_cache()
    assert engine.pool.num_free == engine.pool.total_pages


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, make_tiny) -> Path:
    return make_tiny(request.param)


def new_llm(path: Path, **kw) -> LLM:
    kw.setdefault("page_size", 4)
    kw.setdefault("max_total_tokens", 8192)
    return LLM(str(path), dtype="float32", keep_logits=True, **kw)


def vocab_of(llm: LLM) -> int:
    return len(llm.tokenizer)


def test_batch_matches_transformers(tiny: Path) -> None:
    llm = new_llm(tiny)
    prompts = random_prompts(LENGTHS, vocab_of(llm))
    outs = llm.generate(prompts, GREEDY)
    assert_matches_hf(tiny, prompts, outs)
    assert all(o.finish_reason == "length" for o in outs)
    assert_pages_released(llm)


def test_chunked_prefill_matches_transformers(tiny: Path) -> None:
    llm = new_llm(tiny, chunk_size=24, max_batch_tokens=40)
    prompts = random_prompts(LENGTHS, vocab_of(llm), seed=1)
    outs = llm.generate(prompts, GREEDY)
    assert_matches_hf(tiny, prompts, outs)
    assert_pages_released(llm)


def test_prefix_cache_hits_match_transformers(tiny: Path) -> None:
    llm = new_llm(tiny)
    vocab = vocab_of(llm)
    shared = random_prompts([120], vocab, seed=2)[0]
    tails = random_prompts([1, 5, 17, 40], vocab, seed=3)
    prompts = [shared + t for t in tails]
    first = llm.generate(prompts[:1], GREEDY)
    rest = llm.generate(prompts[1:] + prompts[:1], GREEDY)  # shared prefix, then a repeat
    assert_matches_hf(tiny, prompts[:1], first)
    assert_matches_hf(tiny, prompts[1:] + prompts[:1], rest)
    assert first[0].cached_tokens == 0
    assert all(o.cached_tokens >= 116 for o in rest)
    assert_pages_released(llm)


def test_requests_join_while_others_decode(tiny: Path) -> None:
    llm = new_llm(tiny, chunk_size=32)
    engine = llm.engine
    prompts = random_prompts(LENGTHS, vocab_of(llm), seed=4)
    from engine.llm import Completion

    results: dict[str, Completion] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY)
        results[f"r{i}"] = Completion(prompt)
        for _ in range(3):  # a few steps pass before the next request arrives
            for out in engine.step():
                results[out.rid].add(out)
            engine.check_integrity()
    llm.run_until_done(results)
    assert_matches_hf(tiny, prompts, list(results.values()))
    assert_pages_released(llm)


def test_retraction_under_memory_pressure(make_tiny) -> None:
    path = make_tiny("llama")
    llm = new_llm(path, max_total_tokens=160, page_size=4)  # 40 pages for 8 requests: must retract
    prompts = random_prompts([30, 31, 32, 33, 34, 35, 36, 37], vocab_of(llm), seed=5)
    outs = llm.generate(prompts, GREEDY)
    assert_matches_hf(path, prompts, outs)
    assert_pages_released(llm)
