"""A prompt's logprobs in each API's shape, from the numbers a job's output carries: OpenAI's
echo (lm-eval-harness reads it), vLLM's prompt_logprobs, SGLang's input_token_logprobs."""

from __future__ import annotations

from node import responses as fmt
from node.messages import TokenOutput
from node.prompt_logprobs import (
    echo_entries,
    has_prompt_logprobs,
    sglang_input_logprobs,
    vllm_prompt_logprobs,
)

PROMPT = [10, 11, 12]
TEXT = {10: "A", 11: "b", 12: "cd", 7: "x", 8: "yy"}


def text_of(token: int) -> str:
    return TEXT[token]


def output() -> TokenOutput:
    """Positions 1 and 2 of PROMPT (11 ranked 3rd, 12 the best), then one generated token."""
    return TokenOutput(
        "r", token_ids=[7], logprobs=[-0.5], top_logprobs=[[[7, -0.5], [8, -1.0]]],
        prompt_logprobs=[-3.0, -0.25], prompt_ranks=[3, 1],
        prompt_top_logprobs=[[[7, -1.0], [8, -2.0]], [[12, -0.25], [7, -2.5]]],
    )  # fmt: skip


def test_echo_leads_the_completion_logprobs_with_the_prompt() -> None:
    out = output()
    entries = echo_entries(PROMPT, out, top=2) + fmt.output_entries(out)
    logprobs = fmt.completion_logprobs(entries, text_of, start=0)
    assert logprobs.tokens == ["A", "b", "cd", "x"]
    assert logprobs.token_logprobs == [None, -3.0, -0.25, -0.5]
    # the token itself beside the `top` best (once, where it is the best)
    assert logprobs.top_logprobs == [
        None,
        {"b": -3.0, "x": -1.0, "yy": -2.0},
        {"cd": -0.25, "x": -2.5},
        {"x": -0.5, "yy": -1.0},
    ]
    assert list(logprobs.top_logprobs[1]) == ["b", "x", "yy"]
    one = fmt.completion_logprobs(echo_entries(PROMPT, out, top=1), text_of, start=0)
    assert one.top_logprobs == [None, {"b": -3.0, "x": -1.0}, {"cd": -0.25}]
    assert logprobs.text_offset == [0, 1, 2, 4]


def test_vllm_prompt_logprobs_name_ids_ranks_and_texts() -> None:
    entries = vllm_prompt_logprobs(PROMPT, output(), top=2, text_of=text_of)
    assert entries == [
        None,
        {
            "11": {"logprob": -3.0, "rank": 3, "decoded_token": "b"},
            "7": {"logprob": -1.0, "rank": 1, "decoded_token": "x"},
            "8": {"logprob": -2.0, "rank": 2, "decoded_token": "yy"},
        },
        {
            "12": {"logprob": -0.25, "rank": 1, "decoded_token": "cd"},
            "7": {"logprob": -2.5, "rank": 2, "decoded_token": "x"},
        },
    ]
    assert list(entries[1]) == ["11", "7", "8"]  # the prompt's token first


def test_sglang_input_logprobs_start_where_asked_first_null() -> None:
    out = output()
    whole = sglang_input_logprobs(PROMPT, out, start=0, top=1, text_of=None)
    assert whole == {
        "input_token_logprobs": [[None, 10, None], [-3.0, 11, None], [-0.25, 12, None]],
        "input_top_logprobs": [None, [[-1.0, 7, None]], [[-0.25, 12, None]]],
    }
    tail = sglang_input_logprobs(PROMPT, out, start=1, top=0, text_of=text_of)
    assert tail == {"input_token_logprobs": [[None, 11, "b"], [-0.25, 12, "cd"]]}
    assert sglang_input_logprobs(PROMPT, out, start=3, top=2, text_of=None) == {
        "input_token_logprobs": [],
        "input_top_logprobs": [],
    }


def test_sglang_input_logprobs_of_a_job_that_computed_only_from_the_start() -> None:
    """A job asked from position 1 on reports position 2 alone (prompt_logprobs_first 1)."""
    whole = output()
    out = TokenOutput(
        "r", token_ids=[7], prompt_logprobs=whole.prompt_logprobs[1:],
        prompt_ranks=whole.prompt_ranks[1:], prompt_top_logprobs=whole.prompt_top_logprobs[1:],
        prompt_logprobs_first=1,
    )  # fmt: skip
    assert has_prompt_logprobs(out, PROMPT)
    assert sglang_input_logprobs(PROMPT, out, start=1, top=1, text_of=text_of) == (
        sglang_input_logprobs(PROMPT, whole, start=1, top=1, text_of=text_of)
    )
    merged = TokenOutput("r")
    merged.add(out)  # the HTTP side adds the deltas up
    assert merged.prompt_logprobs_first == 1 and has_prompt_logprobs(merged, PROMPT)
    assert not has_prompt_logprobs(
        TokenOutput("r", prompt_logprobs=[-0.25], prompt_top_logprobs=[[]]), PROMPT
    )


def test_native_result_without_a_start_has_no_prompt_logprobs() -> None:
    asked = fmt.NativeLogprobs(top=1, start=None, text_of=text_of)
    meta = fmt.native_result(output(), 0.1, asked, PROMPT)["meta_info"]
    assert meta["input_token_logprobs"] == [] and meta["input_top_logprobs"] == []
    assert meta["output_token_logprobs"] == [[-0.5, 7, "x"]]
    assert meta["output_top_logprobs"] == [[[-0.5, 7, "x"], [-1.0, 8, "yy"]]]
    moved = fmt.NativeLogprobs(top=0, start=0)  # a moved stream's output carries none
    meta = fmt.native_result(TokenOutput("r", token_ids=[7]), 0.1, moved, PROMPT)["meta_info"]
    assert meta["input_token_logprobs"] == []
