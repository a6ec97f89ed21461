"""From a body to the node's jobs (node/requests.py): how many tokens each prompt may generate,
and the sampling fields as SamplingParams takes them."""

from __future__ import annotations

import pytest

from api.errors import ApiError
from api.openai import MAX_TOKENS_LIMIT, ChatCompletionRequest, CompletionRequest, parse_request
from node import requests as nreq

CONTEXT = 4096


def chat(**fields: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, body)


def completion(**fields: object) -> CompletionRequest:
    return parse_request(CompletionRequest, {"model": "m", "prompt": "hi", **fields})


def test_an_explicit_max_tokens_that_does_not_fit_is_a_400_in_vllm_words() -> None:
    budget = nreq.completion_budget(completion(max_tokens=16), {})
    assert budget.for_prompt(CONTEXT - 16, CONTEXT) == 16  # fits exactly
    with pytest.raises(ApiError) as info:
        budget.for_prompt(4090, CONTEXT)
    error = info.value
    assert (error.status, error.param, error.code) == (400, "max_tokens", "context_length_exceeded")
    assert error.message.startswith(
        "This model's maximum context length is 4096 tokens. However, you requested 4106 tokens "
        "(4090 in the prompt, 16 in the completion)."
    )
    # a chat names its messages, and the field the client sent
    with pytest.raises(ApiError) as info:
        nreq.chat_budget(chat(max_completion_tokens=10), {}).for_prompt(4090, CONTEXT)
    assert info.value.param == "max_completion_tokens"
    assert "(4090 in the messages, 10 in the completion)" in info.value.message


def test_a_prompt_that_leaves_no_room_for_output_is_its_own_400() -> None:
    """Whatever max_tokens says (or without it): the prompt is what to shorten, named by its
    field, in the context_length_exceeded shape."""
    budgets = [
        (nreq.completion_budget(completion(max_tokens=4), {}), "prompt", "prompt"),
        (nreq.completion_budget(completion(), {}), "prompt", "prompt"),
        (nreq.chat_budget(chat(max_tokens=4), {}), "messages", "messages"),
        (nreq.native_budget({"input_ids": [1]}), "input_ids", "prompt"),
        (nreq.native_budget({"text": "x"}), "text", "prompt"),
    ]
    for budget, param, noun in budgets:
        for length in (CONTEXT, CONTEXT + 5):
            with pytest.raises(ApiError) as info:
                budget.for_prompt(length, CONTEXT)
            error = info.value
            assert (error.status, error.param, error.code) == (
                400,
                param,
                "context_length_exceeded",
            )
            assert f"there are {length} tokens in the {noun}, which leaves no room" in error.message
    assert nreq.completion_budget(completion(), {}).for_prompt(CONTEXT - 1, CONTEXT) == 1


def test_an_omitted_max_tokens_fills_the_context_up_to_the_default_and_the_limit() -> None:
    assert nreq.chat_budget(chat(), {}).for_prompt(4090, CONTEXT) == 6  # the rest of the context
    assert nreq.chat_budget(chat(max_tokens=None), {}).for_prompt(96, CONTEXT) == 4000
    limited = {MAX_TOKENS_LIMIT: 50}
    assert nreq.chat_budget(chat(), limited).for_prompt(96, CONTEXT) == 50
    assert nreq.chat_budget(chat(), limited).for_prompt(4090, CONTEXT) == 6
    # completions default to 16, /generate to 128: each at most the rest and the limit
    assert nreq.completion_budget(completion(), {}).for_prompt(96, CONTEXT) == 16
    assert nreq.completion_budget(completion(), {}).for_prompt(4090, CONTEXT) == 6
    assert nreq.completion_budget(completion(), {MAX_TOKENS_LIMIT: 8}).for_prompt(9, CONTEXT) == 8
    assert nreq.native_budget({}).for_prompt(96, CONTEXT) == 128
    assert nreq.native_budget(limited).for_prompt(96, CONTEXT) == 50
    # the limit caps only the default: an explicit value is the gateway's to refuse
    assert nreq.chat_budget(chat(max_tokens=60), limited).for_prompt(96, CONTEXT) == 60


def test_each_prompt_of_a_batch_gets_its_own_budget() -> None:
    budget = nreq.completion_budget(completion(), {})
    prompts = [[1] * 10, [1] * (CONTEXT - 3)]
    assert budget.for_prompts(prompts, CONTEXT) == [16, 3]
    jobs = nreq.make_jobs("r", prompts, {"temperature": 0.0}, 2, {}, [16, 3])
    assert [j.request.params["max_tokens"] for j in jobs] == [16, 16, 3, 3]


@pytest.mark.parametrize("limit", [0, -1, "50", 2.5, True])
def test_a_bad_max_tokens_limit_field_is_a_400(limit: object) -> None:
    with pytest.raises(ApiError) as info:
        nreq.chat_budget(chat(), {MAX_TOKENS_LIMIT: limit})
    assert info.value.param == MAX_TOKENS_LIMIT


@pytest.mark.parametrize("value", [0, -3, "8", 1.5, True])
def test_generate_names_max_new_tokens_not_max_tokens(value: object) -> None:
    with pytest.raises(ApiError) as info:
        nreq.native_budget({"text": "x", "sampling_params": {"max_new_tokens": value}})
    assert info.value.param == "sampling_params.max_new_tokens"
    assert info.value.message.startswith("max_new_tokens must be an integer >= 1")


@pytest.mark.parametrize("name", ["ignore_eos", "skip_special_tokens", "no_stop_trim"])
def test_generate_booleans_are_strict(name: str) -> None:
    with pytest.raises(ApiError) as info:
        nreq.native_params({"text": "x", "sampling_params": {name: "maybe"}})
    assert info.value.param == f"sampling_params.{name}"
    params = nreq.native_params({"text": "x", "sampling_params": {name: True}})
    assert params[nreq.NATIVE_RENAMES.get(name, name)] is True


def test_openai_params_carry_logit_bias_and_the_extensions() -> None:
    req = chat(logit_bias={"17": -100, "5": 2.5}, ignore_eos=True, top_k=4, min_p=None)
    params = nreq.openai_params(req, None)
    assert params["logit_bias"] == {"17": -100.0, "5": 2.5}
    assert params["ignore_eos"] is True and params["top_k"] == 4
    assert "min_p" not in params and "skip_special_tokens" not in params  # null: the default
    assert "logit_bias" not in nreq.openai_params(chat(), None)


@pytest.mark.parametrize("key", ["stream", "return_logprob"])
def test_generate_flags_are_strict(key: str) -> None:
    assert nreq.native_flag({key: True}, key) and not nreq.native_flag({key: None}, key)
    with pytest.raises(ApiError) as info:
        nreq.native_flag({key: "yes"}, key)
    assert info.value.param == key
