"""A rank group's decode steps through the static decode tables: what each rank's CUDA graph
replays on a GPU, run here without capture (engine/cuda_graph.py's capture=False) in Triton's
interpreter over gloo. TP (Llama), TP with expert parallelism and DP attention (DeepSeek-V3),
whose MoE layers then exchange tokens at a fixed capacity (engine/layers/ep.py).

Every rank builds its tables at the same buckets (rank 0 here, the other rank through its
rank-setup hook, as a GPU start does in each runner), decides from the broadcast plan alike
whether a step replays, and pads to the same bucket, so the layers' collectives pair up: the
greedy tokens equal transformers', and rank 0's pool is whole after. Under DP attention the
ranks' batches differ, so they pad to the larger one's bucket, and an idle rank replays only
padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from engine.cuda_graph import DecodeGraphs
from engine.dp_scheduler import DPScheduler
from engine.engine import Engine
from engine.llm import LLM
from engine.options import EngineOptions
from engine.parallel.ranks import RankGroup
from engine.runner import ModelRunner
from tests.test_engine_oracle import (
    GREEDY,
    assert_matches_hf,
    assert_pages_released,
    random_prompts,
)

QWEN_VOCAB = 151936
DEEPSEEK_VOCAB = 129280


def static_decode(runner: ModelRunner, group: RankGroup, payload: Any) -> None:
    """Rank setup: this rank's decode steps through its static tables, as rank 0's."""
    runner.use_decode_graphs(capture=False)


@contextmanager
def static_decode_llm(path: Path, **kw: Any) -> Iterator[tuple[LLM, DecodeGraphs]]:
    """A TP 2 engine (4-token pages, up to 4 running) whose every rank decodes through its
    static tables, and rank 0's tables."""
    options = EngineOptions(
        tp_size=2,
        dist_timeout_s=60,
        dtype="float32",
        attention_backend="triton",
        page_size=4,
        max_total_tokens=512,
        max_running=4,
        max_model_len=64,
        **kw,
    )
    setup = (f"{__name__}:static_decode", None)
    engine = Engine(str(path), options, keep_logits=True, rank_setup=setup)
    with LLM.over(engine) as llm:
        engine.runner.use_decode_graphs(capture=False)
        graphs = engine.runner.decode_graphs
        assert graphs is not None and graphs.buckets == [1, 2, 4]
        yield llm, graphs
        assert_pages_released(llm)


def test_tp2_decode_through_static_tables_equals_transformers(make_tiny) -> None:
    path = make_tiny("llama", "qwen")
    with static_decode_llm(path) as (llm, graphs):
        prompts = random_prompts([3, 9, 14], QWEN_VOCAB, seed=5)  # 3 rows: bucket 4 pads one
        assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))
        assert graphs.replays >= GREEDY.max_tokens - 1


@pytest.mark.parametrize("dp_attention", [False, True], ids=["ep", "dp-attention"])
def test_expert_parallel_decode_through_static_tables_equals_transformers(
    make_tiny, dp_attention: bool
) -> None:
    path = make_tiny("deepseek_v3", "deepseek", layers=2)
    with static_decode_llm(path, ep_size=2, dp_attention=dp_attention) as (llm, graphs):
        # 3 requests: under EP the 3 rows pad to bucket 4 on both ranks; under DP attention
        # one rank decodes 2 and the other 1, and both pad to bucket 2
        prompts = random_prompts([3, 9, 14], DEEPSEEK_VOCAB, seed=5)
        assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))
        assert graphs.replays >= GREEDY.max_tokens - 1
        alone = random_prompts([5], DEEPSEEK_VOCAB, seed=6)  # the other DP rank idles
        before = graphs.replays
        assert_matches_hf(path, alone, llm.generate(alone, GREEDY))
        assert graphs.replays - before >= GREEDY.max_tokens - 1
        scheduler = llm.engine.scheduler
        if dp_attention:  # every rank's pool whole, not only rank 0's
            assert_pages_released(llm)  # (flushes the prefix caches)
            assert isinstance(scheduler, DPScheduler)
            assert all(s.pool.num_free == s.pool.total_pages for s in scheduler.ranks)
