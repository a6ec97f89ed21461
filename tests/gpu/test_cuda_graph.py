"""Decode CUDA graphs (engine/cuda_graph.py) on a GPU: the same greedy tokens with them as
without, at batch sizes that pad to their bucket, and the graphs really replayed. GPU-marked:
skipped without CUDA; scripts/gpu_check.sh runs them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.llm import LLM
from tests.test_engine_oracle import GREEDY, random_prompts

pytestmark = pytest.mark.gpu

BATCHES = [1, 3, 17]  # buckets 1, 4 and 24: the last two pad


def cuda_llm(path, graphs: bool) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        device="cuda",
        attention_backend="triton",
        cuda_graphs=graphs,
        page_size=4,
        max_total_tokens=16384,
        max_running=32,
    )


def test_graphs_on_and_off_give_the_same_tokens(make_tiny) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    path = make_tiny("llama", layers=3)
    prompts = random_prompts([5 + 7 * i for i in range(max(BATCHES))], 151936, seed=5)
    eager, graphed = cuda_llm(path, False), cuda_llm(path, True)
    assert eager.engine.runner.decode_graphs is None
    graphs = graphed.engine.runner.decode_graphs
    assert graphs is not None, "no decode graphs captured (see the engine's warning)"
    assert graphs.buckets == [1, 2, 4, 8, 16, 24, 32]
    assert sorted(graphs.graphs) == graphs.buckets  # every bucket captured
    for batch in BATCHES:
        before = graphs.replays
        want = eager.generate(prompts[:batch], GREEDY)
        got = graphed.generate(prompts[:batch], GREEDY)
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert a.token_ids == b.token_ids, f"batch {batch}, prompt {i}: graphs changed tokens"
        # every step after the prefill decodes all rows at once: one replay each
        assert graphs.replays - before >= GREEDY.max_tokens - 1, f"batch {batch} ran eager"


def test_graphs_with_sampled_logits(make_tiny) -> None:
    """keep_logits: the graphs' static logits come back (copied out) and match eager's."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    path = make_tiny("llama", layers=3)
    prompts = random_prompts([9, 30, 2], 151936, seed=6)
    kw = {"dtype": "float32", "device": "cuda", "attention_backend": "triton", "page_size": 4}
    kw |= {"max_total_tokens": 8192, "max_running": 8}
    eager = LLM(str(path), keep_logits=True, cuda_graphs=False, **kw)
    graphed = LLM(str(path), keep_logits=True, **kw)
    want, got = eager.generate(prompts, GREEDY), graphed.generate(prompts, GREEDY)
    for a, b in zip(want, got, strict=True):
        assert a.token_ids == b.token_ids
        assert len(a.logits) == len(b.logits)
        for x, y in zip(a.logits, b.logits):
            assert (x - y).abs().max().item() < 1e-3
    assert graphed.engine.runner.decode_graphs.replays > 0


GROUPS = [
    pytest.param("llama", {}, id="tp2"),
    pytest.param("deepseek_v3", {"ep_size": 2}, id="tp2-ep2"),
    pytest.param("deepseek_v3", {"ep_size": 2, "dp_attention": True}, id="dp-attention"),
]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one per rank)")
@pytest.mark.parametrize(("arch", "parallel"), GROUPS)
def test_rank_groups_replay_graphs_with_the_same_tokens(make_tiny, arch, parallel) -> None:
    """Two ranks on two GPUs, each capturing its own graphs with the NCCL collectives (and
    under EP the fixed-capacity all-to-alls) inside: the same tokens as eager steps."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    deepseek = arch == "deepseek_v3"
    path = make_tiny(arch, "deepseek", layers=2) if deepseek else make_tiny(arch, layers=2)
    vocab = 129280 if deepseek else 151936
    prompts = random_prompts([5, 12, 30], vocab, seed=7)
    kw = {"dtype": "float32", "device": "cuda", "attention_backend": "triton", "page_size": 4}
    kw |= {"max_total_tokens": 4096, "max_running": 8, "tp_size": 2, **parallel}
    want = {}
    with LLM(str(path), cuda_graphs=False, **kw) as eager:
        for batch in (1, 3):
            want[batch] = [o.token_ids for o in eager.generate(prompts[:batch], GREEDY)]
    with LLM(str(path), **kw) as graphed:
        graphs = graphed.engine.runner.decode_graphs
        assert graphs is not None, "no decode graphs captured (see the engine's warning)"
        for batch in (1, 3):
            before = graphs.replays
            got = [o.token_ids for o in graphed.generate(prompts[:batch], GREEDY)]
            assert got == want[batch], f"batch {batch}: graphs changed tokens"
            assert graphs.replays - before >= GREEDY.max_tokens - 1, f"batch {batch} ran eager"
