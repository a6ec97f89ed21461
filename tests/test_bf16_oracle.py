"""bfloat16, the GPU's dtype, against transformers: the engine's prefill logits are as close
to float32 transformers as transformers' own bfloat16 run is, long prompts included.

Token equality is too strict a check in bf16 (rounding flips near ties); the error against the
float32 reference is not. A precision bug shows as an error many times transformers' own: rope
frequencies rounded to bf16 made it 6x at 1200 tokens.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from engine.llm import LLM
from engine.sampling import SamplingParams
from tests.test_engine_oracle import random_prompts

LENGTHS = [30, 1200]


@cache
def hf_last_logits(path: str, dtype: torch.dtype, prompt: tuple[int, ...]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config._attn_implementation = "eager"
    with torch.inference_mode():
        return model.eval()(torch.tensor([prompt])).logits[0, -1].float()


def assert_bf16_close(path: str, **engine: object) -> None:
    """The engine in bf16 (`engine`: more LLM options, a device, a backend) on LENGTHS-token
    prompts: last-position logits within twice transformers' own bf16 error (+0.1)."""
    prompts = random_prompts(LENGTHS, 100_000, seed=5)
    llm = LLM(path, dtype="bfloat16", keep_logits=True, page_size=16, max_total_tokens=4096,
              **engine)  # fmt: skip
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
    for prompt, out in zip(prompts, outs, strict=True):
        want = hf_last_logits(path, torch.float32, tuple(prompt))
        theirs = (hf_last_logits(path, torch.bfloat16, tuple(prompt)) - want).abs().max().item()
        ours = (out.logits[0].float().cpu() - want).abs().max().item()
        assert ours <= 2 * theirs + 0.1, (
            f"{len(prompt)} tokens: bf16 logits off by {ours:.3f}, transformers' by {theirs:.3f}"
        )


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_bf16_prefill_is_as_close_to_float32_as_transformers_bf16(make_tiny, arch: str) -> None:
    deepseek = arch == "deepseek_v3"
    assert_bf16_close(str(make_tiny(arch, "deepseek" if deepseek else "qwen", layers=2)))
