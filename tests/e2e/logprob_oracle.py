"""Checking an API's prompt logprobs against transformers (fp32, eager): the answer's numbers
equal log_softmax of transformers' logits at each position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.tokenizer import load_tokenizer
from tests.test_prompt_logprobs import ATOL, hf_logprobs


def token_texts(model: Path, ids: list[int]) -> list[str]:
    tok = load_tokenizer(model)
    return [tok.decode([t]) for t in ids]


def assert_echo_logprobs(model: Path, prompt: list[int], logprobs: Any, top: int) -> None:
    """OpenAI's legacy logprobs of an echoed prompt plus its generated tokens: `null` first,
    then each prompt token's logprob and the `top` best (the token itself beside them), then
    the generated tokens' (greedy: each the best)."""
    expected = hf_logprobs(str(model), tuple(prompt))
    texts = token_texts(model, prompt)
    n = len(prompt)
    assert logprobs.tokens[:n] == texts
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, n):
        want = expected[i - 1, prompt[i]].item()
        assert logprobs.token_logprobs[i] == pytest.approx(want, abs=ATOL), f"position {i}"
        best = dict(logprobs.top_logprobs[i])
        assert best[texts[i]] == pytest.approx(want, abs=ATOL)
        assert max(top, 1) <= len(best) <= top + 1
        if top > 0:
            assert max(best.values()) == pytest.approx(expected[i - 1].max().item(), abs=ATOL)
    generated = logprobs.token_logprobs[n]
    assert generated == pytest.approx(expected[n - 1].max().item(), abs=ATOL)
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert offsets[n] == sum(len(t) for t in texts)


def assert_vllm_prompt_logprobs(model: Path, prompt: list[int], entries: Any, top: int) -> None:
    """vLLM's prompt_logprobs: null, then {token id: {logprob, rank, decoded_token}}."""
    expected = hf_logprobs(str(model), tuple(prompt))
    texts = token_texts(model, prompt)
    assert len(entries) == len(prompt) and entries[0] is None
    for i in range(1, len(prompt)):
        entry = entries[i]
        mine = entry[str(prompt[i])]
        want = expected[i - 1, prompt[i]].item()
        assert mine["logprob"] == pytest.approx(want, abs=ATOL)
        assert mine["decoded_token"] == texts[i] and mine["rank"] >= 1
        ranks = sorted(e["rank"] for t, e in entry.items() if t != str(prompt[i]))
        assert top <= len(entry) <= top + 1 and ranks == list(range(1, len(ranks) + 1))


def assert_sglang_input_logprobs(
    model: Path, prompt: list[int], meta: dict, start: int, top: int
) -> None:
    """SGLang's input_token_logprobs from `start` on ([logprob, id, text], the first null)
    and input_top_logprobs."""
    expected = hf_logprobs(str(model), tuple(prompt))
    texts = token_texts(model, prompt)
    tokens, best = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert [t[1:] for t in tokens] == [[prompt[i], texts[i]] for i in range(start, len(prompt))]
    assert tokens[0][0] is None and best[0] is None and len(best) == len(tokens)
    for j, i in enumerate(range(start + 1, len(prompt)), start=1):
        assert tokens[j][0] == pytest.approx(expected[i - 1, prompt[i]].item(), abs=ATOL)
        values = [v for v, _, _ in best[j]]
        assert values == pytest.approx(expected[i - 1].topk(top).values.tolist(), abs=ATOL)
