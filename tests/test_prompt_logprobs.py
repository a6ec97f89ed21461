"""Prompt logprobs against transformers (fp32, eager): every prompt position's logprob, rank and
top tokens equal log_softmax of transformers' logits there, for Llama and DeepSeek-V3 (MLA +
MoE), across chunked-prefill chunks, on a prefix-cache hit, under retraction, and beside
requests that ask none, whose outputs stay exactly as without them.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch

from engine.llm import LLM, Completion
from engine.prompt_logprobs import PromptLogprobs
from engine.sampling import SamplingParams
from tests.test_engine_oracle import _hf_model, assert_pages_released, new_llm, random_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-4
TOP = 3
ASK = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=TOP)
PLAIN = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
MODELS = [
    pytest.param(("llama", "qwen", {}), id="llama"),
    pytest.param(("deepseek_v3", "deepseek", {"layers": 3}), id="deepseek-v3"),
]


@pytest.fixture(scope="module", params=MODELS)
def tiny(request, make_tiny) -> Path:
    arch, tokenizer, kw = request.param
    return make_tiny(arch, tokenizer, **kw)


@cache
def hf_logprobs(path: str, prompt: tuple[int, ...]) -> torch.Tensor:
    """log_softmax of transformers' float32 logits at every prompt position [len, vocab]."""
    with torch.inference_mode():
        logits = _hf_model(path)(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(dim=-1)


def assert_prompt_logprobs(
    path: Path, prompt: list[int], got: PromptLogprobs | None, first: int = 0
) -> None:
    """`got` holds every prompt position from `first` + 1 on, as transformers computes them."""
    assert got is not None and got.sent and got.first == first
    assert len(got.logprobs) == len(got.ranks) == len(got.top) == len(prompt) - 1 - first
    expected = hf_logprobs(str(path), tuple(prompt))
    for j, token in enumerate(prompt[first + 1 :]):
        i = first + j
        row = expected[i]
        want = row[token].item()
        assert got.logprobs[j] == pytest.approx(want, abs=ATOL), f"position {i + 1}"
        # the rank as transformers' logprobs give it, up to ties within the tolerance
        assert (row >= want + ATOL).sum() + 1 <= got.ranks[j] <= (row >= want - ATOL).sum()
        ids = [t for t, _ in got.top[j]]
        assert len(ids) == TOP and len(set(ids)) == TOP
        assert [v for _, v in got.top[j]] == pytest.approx(row.topk(TOP).values.tolist(), abs=ATOL)
        assert [v for _, v in got.top[j]] == pytest.approx(row[ids].tolist(), abs=ATOL)


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
    return llm.generate(prompts, params)


def test_every_position_matches_transformers_across_chunks(tiny: Path) -> None:
    """Prompts longer than the chunk, one of a single token, in one batch."""
    llm = new_llm(tiny, chunk_size=16, max_batch_tokens=40)
    prompts = random_prompts([1, 2, 40, 150], len(llm.tokenizer), seed=21)
    outs = run(llm, prompts, [ASK] * len(prompts))
    for prompt, out in zip(prompts, outs, strict=True):
        assert_prompt_logprobs(tiny, prompt, out.prompt_logprobs)
        assert len(out.token_ids) == 3
    assert_pages_released(llm)


@pytest.mark.parametrize("keep_logits", [True, False], ids=["logits", "argmax"])
def test_requests_asking_none_stay_unchanged_beside_them(tiny: Path, keep_logits: bool) -> None:
    """The same batch with and without prompt logprobs asked by half of it (the greedy argmax
    path too): every request's tokens (and sampled logits, bit for bit) are the same."""
    llm = LLM(str(tiny), dtype="float32", keep_logits=keep_logits, page_size=4,
              max_total_tokens=8192, chunk_size=24, max_batch_tokens=48)  # fmt: skip
    prompts = random_prompts([5, 60, 33, 90], len(llm.tokenizer), seed=22)
    unasked = replace(ASK, prompt_logprobs=None)
    without = run(llm, prompts, [PLAIN, unasked, PLAIN, unasked])
    assert llm.engine.flush_cache()
    mixed = run(llm, prompts, [PLAIN, ASK, PLAIN, ASK])
    for before, after in zip(without, mixed, strict=True):
        assert after.token_ids == before.token_ids
        assert len(after.logits) == len(before.logits)
        assert all(torch.equal(a, b) for a, b in zip(before.logits, after.logits, strict=True))
    assert mixed[0].prompt_logprobs is None and mixed[2].prompt_logprobs is None
    for prompt, out in zip(prompts[1::2], mixed[1::2], strict=True):
        assert_prompt_logprobs(tiny, prompt, out.prompt_logprobs)
    assert_pages_released(llm)


def test_a_cached_prefix_is_computed_again_for_them(tiny: Path) -> None:
    """The same prompt twice: the second asks too, and its prefix is in the cache; it still
    reports every position (none served from the cache), and what it computed is cached."""
    llm = new_llm(tiny)
    prompt = random_prompts([70], len(llm.tokenizer), seed=23)[0]
    first, second = run(llm, [prompt], [ASK])[0], run(llm, [prompt], [ASK])[0]
    assert second.cached_tokens == 0
    for out in (first, second):
        assert_prompt_logprobs(tiny, prompt, out.prompt_logprobs)
    plain = run(llm, [prompt], [PLAIN])[0]
    assert plain.cached_tokens >= 64 and plain.prompt_logprobs is None
    assert_pages_released(llm)


def test_a_start_reports_from_there_and_takes_the_cached_prefix_before_it(tiny: Path) -> None:
    """SGLang's logprob_start_len (lm-eval scoring a continuation): the context before it comes
    from the prefix cache and goes through no LM head; the positions after it are exact."""
    llm = new_llm(tiny)
    prompt = random_prompts([70], len(llm.tokenizer), seed=26)[0]
    run(llm, [prompt], [PLAIN])  # the context is cached
    start = 40
    out = run(llm, [prompt], [replace(ASK, prompt_logprobs_start=start)])[0]
    assert out.cached_tokens == start  # 10 pages of 4
    assert_prompt_logprobs(tiny, prompt, out.prompt_logprobs, first=start)
    past = run(llm, [prompt], [replace(ASK, prompt_logprobs_start=len(prompt))])[0]
    assert_prompt_logprobs(tiny, prompt, past.prompt_logprobs, first=len(prompt) - 1)
    assert past.cached_tokens == (len(prompt) - 1) // 4 * 4  # no position left to compute
    assert_pages_released(llm)


def test_retracted_requests_report_each_position_once(make_tiny) -> None:
    """40 pages for 8 requests: some are retracted and recomputed, their logprobs whole."""
    path = make_tiny("llama")
    llm = new_llm(path, max_total_tokens=160, page_size=4, chunk_size=16)
    prompts = random_prompts([30, 31, 32, 33, 34, 35, 36, 37], len(llm.tokenizer), seed=24)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=TOP)
    for prompt, out in zip(prompts, run(llm, prompts, [params] * 8), strict=True):
        assert_prompt_logprobs(path, prompt, out.prompt_logprobs)
    assert_pages_released(llm)


def test_a_request_retracted_mid_prefill_goes_on_where_it_was(make_tiny) -> None:
    """Two chunks in, retracted (its pages freed): recomputed from the start, it reports each
    position once."""
    path = make_tiny("llama")
    llm = new_llm(path, chunk_size=16)
    prompt = random_prompts([60], len(llm.tokenizer), seed=26)[0]
    engine = llm.engine
    req = engine.add_request("r", prompt, ASK)
    for _ in range(2):
        assert engine.step() == []
    assert req.prompt_logprobs is not None and len(req.prompt_logprobs.logprobs) == 32
    engine.scheduler.retract(req)
    results = {"r": Completion(prompt)}
    llm.run_until_done(results)
    assert_prompt_logprobs(path, prompt, results["r"].prompt_logprobs)
    assert_pages_released(llm)


def test_resumed_and_prefill_only_requests_report_none(make_tiny) -> None:
    """A moved stream's replayed output is not prompt; a prefill node's answer is not the
    client's. A PD reservation (the prompt's KV from elsewhere) cannot give them: refused."""
    path = make_tiny("llama")
    llm = new_llm(path)
    engine = llm.engine
    prompt = random_prompts([20], len(llm.tokenizer), seed=25)[0]
    engine.add_request("resumed", prompt, ASK, resumed=2)
    engine.add_request("prefill", prompt, ASK, prefill_only=True)
    results = {"resumed": Completion(prompt), "prefill": Completion(prompt)}
    llm.run_until_done(results)
    assert all(r.prompt_logprobs is None and r.token_ids for r in results.values())
    engine.release("prefill")
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.reserve("reserved", prompt, ASK)
    assert_pages_released(llm)


def test_bad_prompt_logprobs_are_refused() -> None:
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="prompt_logprobs must be in"):
            SamplingParams(prompt_logprobs=bad).validate()
