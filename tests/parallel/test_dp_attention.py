"""DP attention (`dp_attention`, SGLang's --enable-dp-attention) against transformers: two real
rank processes over gloo, each running attention for its own requests over its own latent cache,
the routed experts expert-parallel across both.

Greedy tokens equal transformers' and prefill logits agree within 1e-3 for DeepSeek-V3 (with
and without q_lora), whether the requests spread over both ranks or one rank runs alone while
the other idles through the all-to-alls; prefix hits land on the rank that cached the prefix;
seeded sampling draws the same tokens as one rank. Every rank's page pool is whole after.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.dp_scheduler import DPScheduler
from engine.layers import moe
from engine.llm import LLM
from engine.options import EngineOptions
from engine.parallel.check import check_parallel
from engine.sampling import SamplingParams
from tests.parallel.test_ep_exchange import count_exchanges
from tests.test_deepseek import VOCAB
from tests.test_engine_oracle import (
    GREEDY,
    assert_matches_hf,
    assert_pages_released,
    hf_reference,
    new_llm,
    random_prompts,
)

CASES = [
    pytest.param({"layers": 3}, id="v3"),
    pytest.param({"layers": 3, "config_overrides": {"q_lora_rank": None}}, id="v3-no-q-lora"),
]


def dp_llm(path: Path, **kw) -> LLM:
    return new_llm(path, tp_size=2, ep_size=2, dp_attention=True, dist_timeout_s=30, **kw)


@pytest.fixture(scope="module", params=CASES)
def case(request, make_tiny) -> Iterator[tuple[Path, LLM]]:
    path = make_tiny("deepseek_v3", "deepseek", **request.param)
    llm = dp_llm(path)
    yield path, llm
    llm.close()


def ranks_of(llm: LLM) -> DPScheduler:
    scheduler = llm.engine.scheduler
    assert isinstance(scheduler, DPScheduler)
    return scheduler


def assert_every_pool_whole(llm: LLM) -> None:
    assert_pages_released(llm)
    for s in ranks_of(llm).ranks:
        assert s.pool.num_free == s.pool.total_pages


def test_batch_spreads_over_the_ranks_and_matches_transformers(case) -> None:
    path, llm = case
    prompts = random_prompts([1, 7, 33, 150], VOCAB, seed=21)
    outs = llm.generate(prompts, GREEDY)
    assert_matches_hf(path, prompts, outs)
    cached = [s.cache.cached_pages for s in ranks_of(llm).ranks]  # type: ignore[union-attr]
    assert all(n > 0 for n in cached), f"the requests did not use both ranks: {cached}"
    assert_every_pool_whole(llm)


def test_one_request_runs_while_the_other_rank_idles(case) -> None:
    path, llm = case
    prompts = random_prompts([40], VOCAB, seed=22)
    assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))
    assert_every_pool_whole(llm)


def test_decode_steps_exchange_at_a_fixed_capacity_prefill_at_counted_sizes(
    case, monkeypatch
) -> None:
    """Rank 0's MoE layers: prefill steps exchange at the sizes the ranks tell each other,
    decode steps at a fixed capacity (no host sync), both ranks alike or the tokens would
    not match."""
    path, llm = case
    calls = count_exchanges(monkeypatch)
    prompts = random_prompts([12, 30], VOCAB, seed=24)
    assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))
    layers = sum(isinstance(m, moe.MoE) for m in llm.engine.runner.model.modules())
    assert calls["counted"] == layers  # one prefill step: both prompts at once
    assert calls["fixed"] == layers * (GREEDY.max_tokens - 1)
    assert_every_pool_whole(llm)


def test_requests_one_at_a_time_take_the_ranks_in_turn(case) -> None:
    """Each request gone before the next comes (every rank idle, no prefix cached that helps):
    they take the ranks in turn rather than all the lowest."""
    _, llm = case
    before = list(ranks_of(llm).placed)
    for prompt in random_prompts([9, 10, 11, 12], VOCAB, seed=25):
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert [a - b for a, b in zip(ranks_of(llm).placed, before, strict=True)] == [2, 2]
    assert_every_pool_whole(llm)


def test_prefix_hits_go_to_the_rank_that_cached_the_prefix(case) -> None:
    path, llm = case
    prefix = random_prompts([70], VOCAB, seed=23)[0]
    first = [[*prefix, 5, 6, 7]]
    assert_matches_hf(path, first, llm.generate(first, GREEDY))
    holders = [r for r, s in enumerate(ranks_of(llm).ranks) if s.cache.cached_pages]  # type: ignore[union-attr]
    assert len(holders) == 1
    second = [[*prefix, 8, 9]]
    outs = llm.generate(second, GREEDY)
    assert outs[0].cached_tokens >= 64, f"the request missed the prefix on rank {holders[0]}"
    assert_matches_hf(path, second, outs)
    assert_every_pool_whole(llm)


def test_chunked_prefill_and_greedy_ids_without_logits(make_tiny) -> None:
    """Chunks of 16 tokens; and greedy with no logits asked for: each rank's LM head finds its
    rows' argmax and only the ids are gathered."""
    path = make_tiny("deepseek_v3", "deepseek", layers=3)
    prompts = random_prompts([90, 31, 12], VOCAB, seed=24)
    with dp_llm(path, chunk_size=16, max_batch_tokens=24) as llm:
        assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))
        assert_every_pool_whole(llm)
    engine_kw = {"page_size": 4, "max_total_tokens": 8192, "dtype": "float32"}
    with LLM(str(path), tp_size=2, ep_size=2, dp_attention=True, **engine_kw) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert_every_pool_whole(llm)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_reference(str(path), tuple(prompt))[0]


def test_sampling_draws_what_one_rank_draws(make_tiny) -> None:
    """Seeded sampling, penalties and logprobs over the gathered rows: the same tokens and
    logprobs as one rank."""
    path = make_tiny("deepseek_v3", "deepseek", layers=3)
    prompts = random_prompts([9, 40, 3], VOCAB, seed=25)
    params = SamplingParams(
        temperature=0.8, top_p=0.9, seed=7, max_tokens=8, logprobs=2, presence_penalty=0.5,
        ignore_eos=True,
    )  # fmt: skip
    one = new_llm(path).generate(prompts, params)
    with dp_llm(path) as llm:
        two = llm.generate(prompts, params)
        assert_every_pool_whole(llm)
    for a, b in zip(one, two, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_dp_attention_is_refused_where_it_cannot_run(make_tiny) -> None:
    with pytest.raises(ValueError, match="ep_size = tp_size"):
        EngineOptions(tp_size=2, dp_attention=True)
    with pytest.raises(ValueError, match="tp_size > 1"):
        EngineOptions(dp_attention=True)
    from engine.config import ModelConfig

    llama = ModelConfig.load(make_tiny("llama", "qwen"))
    with pytest.raises(ValueError, match="MLA MoE models"):
        check_parallel(llama, EngineOptions(tp_size=2, ep_size=2, dp_attention=True))
