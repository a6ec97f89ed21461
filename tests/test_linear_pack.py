"""bfloat16 weights packed once into oneDNN's layout (engine/layers/linear.py) give the same
tokens and logits as the unpacked weights, and are made only within their memory budget."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import decode_layer
from engine.layers.linear import Linear, linear, pack_bf16_weights
from engine.llm import LLM
from engine.sampling import SamplingParams

onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available()
    or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"),
    reason="this torch build has no oneDNN linear",
)
PROMPTS = [[5, 17, 300, 9], list(range(100, 190)), [42, 43]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)


@onednn
@pytest.mark.parametrize("rows", [1, 16, 40])
def test_a_packed_weight_gives_f_linears_numbers(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(96, 200, bias=True)
    layer.weight.data = torch.randn(200, 96, generator=gen).bfloat16()
    layer.bias.data = torch.randn(200, generator=gen).bfloat16()
    x = torch.randn(2, rows, 96, generator=gen).bfloat16()
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert pack_bf16_weights(layer) == 200 * 96 * 2 and layer.packed is not None
    assert torch.equal(layer(x), expected)
    # float32 keeps its own path (oneDNN or MKL by row count: equal up to summation order)
    torch.testing.assert_close(
        linear(x.float(), layer.weight.float()), x.float() @ layer.weight.float().T
    )


@onednn
def test_packing_stays_within_its_budget() -> None:
    layer = Linear(64, 64)
    layer.weight.data = layer.weight.data.bfloat16()
    assert pack_bf16_weights(layer, budget=64 * 64 * 2 - 1) == 0 and layer.packed is None
    float32 = Linear(64, 64)
    assert pack_bf16_weights(float32) == 0 and float32.packed is None


@onednn
def test_an_engine_with_packed_weights_generates_what_the_plain_path_does(
    make_tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bfloat16 model the fused decode step does not take (here: its budget is 0) runs its
    layers on packed weights, token for token and logprob for logprob as on F.linear."""
    model = str(make_tiny("qwen2"))  # qkv bias too
    monkeypatch.setattr(decode_layer, "BF16_MAX_BYTES", 0)
    llm = LLM(model, dtype="bfloat16")
    assert llm.engine.runner.fused_decode is None
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert layers and all(m.packed is not None for m in layers)
    packed = llm.generate(PROMPTS, GREEDY)
    for m in layers:
        m.packed = None
    assert llm.engine.flush_cache()
    for a, b in zip(packed, llm.generate(PROMPTS, GREEDY), strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
