"""Request preparation (limits, batching, routing keys) and the PD body sent to both nodes."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from api.chat import TemplateOptions
from api.errors import ApiError
from api.openai import MAX_TOKENS_LIMIT
from api.settings import Instance
from gateway.breaker import CircuitBreaker
from gateway.dispatch import attempt_rid
from gateway.limits import PromptCounter
from gateway.pd import pd_body
from gateway.requests import CHAT, COMPLETIONS, GENERATE, RequestLimits, prepare
from gateway.workers import Pair, Worker

NO_LIMITS = RequestLimits()


def error_of(route: str, body: dict, limits: RequestLimits = NO_LIMITS) -> ApiError:
    with pytest.raises(ApiError) as info:
        prepare(route, body, limits)
    return info.value


def test_room_lists_follow_sglang() -> None:
    def batch(route: str, body: dict) -> int | None:
        return prepare(route, body, NO_LIMITS).rooms

    assert batch(GENERATE, {"text": "a"}) is None
    assert batch(GENERATE, {"text": ["a", "b"]}) == 2
    assert batch(GENERATE, {"input_ids": [1, 2, 3]}) is None  # one prompt of ids
    assert batch(GENERATE, {"input_ids": [[1, 2], [3]]}) == 2
    assert batch(COMPLETIONS, {"model": "m", "prompt": "a"}) is None
    assert batch(COMPLETIONS, {"model": "m", "prompt": [5, 6]}) is None
    assert batch(COMPLETIONS, {"model": "m", "prompt": ["a", "b", "c"]}) == 3
    assert batch(CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}]}) is None
    assert batch(CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}) == 3
    assert batch(COMPLETIONS, {"model": "m", "prompt": "a", "n": 2}) == 2
    assert batch(COMPLETIONS, {"model": "m", "prompt": ["a", "b"], "n": 2}) == 4
    assert batch(COMPLETIONS, {"model": "m", "prompt": ["a"]}) == 1
    assert batch(GENERATE, {"text": "a", "sampling_params": {"n": 2}}) is None  # native: no n


def test_generate_validation() -> None:
    assert error_of(GENERATE, {}).param == "text"
    assert error_of(GENERATE, {"text": "a", "input_ids": [1]}).param == "text"
    assert error_of(GENERATE, {"input_ids": [[]]}).param == "input_ids"
    assert error_of(GENERATE, {"text": 5}).param == "text"
    assert error_of(GENERATE, {"text": "a", "sampling_params": []}).param == "sampling_params"
    bad = error_of(GENERATE, {"text": "a", "sampling_params": {"max_new_tokens": -1}})
    assert bad.param == "sampling_params.max_new_tokens"
    assert error_of(GENERATE, {"text": "a", "stream": "yes"}).param == "stream"


def test_max_tokens_limit() -> None:
    limits = RequestLimits(max_tokens=100)
    prepare(COMPLETIONS, {"model": "m", "prompt": "a", "max_tokens": 100}, limits)
    e = error_of(COMPLETIONS, {"model": "m", "prompt": "a", "max_tokens": 101}, limits)
    assert e.status == 400 and e.param == "max_tokens" and "limit of 100" in e.message
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert error_of(CHAT, {**chat, "max_completion_tokens": 500}, limits).param == (
        "max_completion_tokens"
    )
    e = error_of(GENERATE, {"text": "a", "sampling_params": {"max_new_tokens": 101}}, limits)
    assert e.param == "sampling_params.max_new_tokens"


def test_max_tokens_limit_reaches_the_nodes_for_requests_that_omit_max_tokens() -> None:
    """Leaving max_tokens out must not get around the limit: the body tells the nodes the limit,
    and they cap the default (the rest of the context, 16, or /generate's 128) with it."""
    limits = RequestLimits(max_tokens=50)
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    bodies = [
        (CHAT, chat),
        (CHAT, {**chat, "max_tokens": None}),
        (COMPLETIONS, {"model": "m", "prompt": "a"}),
        (GENERATE, {"text": "a"}),
        (GENERATE, {"text": "a", "sampling_params": {"temperature": 0}}),
    ]
    for route, body in bodies:
        assert prepare(route, body, limits).body[MAX_TOKENS_LIMIT] == 50, (route, body)
        assert MAX_TOKENS_LIMIT not in prepare(route, body, NO_LIMITS).body
    assert MAX_TOKENS_LIMIT not in chat  # the client's body is not changed


def test_max_new_tokens_of_zero_names_the_field_sent() -> None:
    e = error_of(GENERATE, {"text": "a", "sampling_params": {"max_new_tokens": 0}})
    assert e.param == "sampling_params.max_new_tokens"
    assert e.message.startswith("max_new_tokens must be an integer >= 1")


def test_sequences_limit_counts_prompts_times_n() -> None:
    limits = RequestLimits(max_sequences=4)
    prepare(COMPLETIONS, {"model": "m", "prompt": ["a", "b"], "n": 2}, limits)
    e = error_of(COMPLETIONS, {"model": "m", "prompt": ["a", "b", "c"], "n": 2}, limits)
    assert e.status == 400 and e.param == "n" and "6 sequences" in e.message
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 5}
    assert "limit of 4" in error_of(CHAT, chat, limits).message
    assert error_of(GENERATE, {"text": list("abcde")}, limits).status == 400


def test_prompt_token_limit_counts_ids_without_a_tokenizer() -> None:
    limits = RequestLimits(max_prompt_tokens=3)
    prepare(GENERATE, {"input_ids": [1, 2, 3]}, limits)
    e = error_of(GENERATE, {"input_ids": [[1], [1, 2, 3, 4]]}, limits)
    assert e.code == "context_length_exceeded" and "4 tokens" in e.message
    prepare(COMPLETIONS, {"model": "m", "prompt": "a very long text " * 50}, limits)  # uncounted


def test_prompt_token_limit_with_the_model_tokenizer(make_tiny: Callable[..., Path]) -> None:
    counter = PromptCounter.load(str(make_tiny("llama")))
    text = "hello world " * 20
    n = counter.count_text(text)
    limits = RequestLimits(max_prompt_tokens=n, counter=counter)
    prepare(COMPLETIONS, {"model": "m", "prompt": text}, limits)
    assert (
        error_of(COMPLETIONS, {"model": "m", "prompt": text + "and more words"}, limits).param
        == "prompt"
    )
    messages = [{"role": "user", "content": text}]
    chat_tokens = counter.count_chat(messages)
    assert chat_tokens > n  # the template adds role markers
    e = error_of(CHAT, {"model": "m", "messages": messages}, limits)
    assert e.param == "messages" and f"{chat_tokens} tokens" in e.message
    # counted as the node renders it: vLLM's add_generation_prompt false leaves the last tokens out
    bare = counter.count_chat(messages, options=TemplateOptions(add_generation_prompt=False))
    limits = RequestLimits(max_prompt_tokens=bare, counter=counter)
    assert bare < chat_tokens and error_of(CHAT, {"model": "m", "messages": messages}, limits)
    prepare(CHAT, {"model": "m", "messages": messages, "add_generation_prompt": False}, limits)


def test_unknown_model_is_404_with_the_served_names() -> None:
    limits = RequestLimits(models=frozenset({"tiny"}))
    prepare(COMPLETIONS, {"model": "tiny", "prompt": "a"}, limits)
    e = error_of(COMPLETIONS, {"model": "gpt-9", "prompt": "a"}, limits)
    assert (e.status, e.code, e.param) == (404, "model_not_found", "model")
    assert "tiny" in e.message


def test_routing_key_text_and_token_estimate() -> None:
    key = prepare(GENERATE, {"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": 5}},
                  NO_LIMITS).key  # fmt: skip
    assert key.text == "7,8,9" and key.tokens == 8
    chat = prepare(CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, NO_LIMITS)
    assert chat.key.text == "user: hi\n"


def worker(role: str, url: str, port: int | None = None) -> Worker:
    return Worker(role, Instance(url, port), CircuitBreaker(5, 1.0))  # type: ignore[arg-type]


def test_pd_body_adds_bootstrap_fields_and_rid() -> None:
    prefill = worker("prefill", "http://10.1.2.3:30001", 8998)
    decode = worker("decode", "http://10.1.2.4:30002")
    req = prepare(COMPLETIONS, {"model": "m", "prompt": "a", "top_k": 3}, NO_LIMITS)
    body = pd_body(req, "rid-1", Pair(prefill, decode), random.Random(0))
    assert body["bootstrap_host"] == "10.1.2.3" and body["bootstrap_port"] == 8998
    assert 0 <= body["bootstrap_room"] < 2**63 and body["rid"] == "rid-1"
    assert body["top_k"] == 3 and "bootstrap_room" not in req.body  # the client's body is kept


def test_pd_body_lists_for_a_batch_and_nothing_when_colocated() -> None:
    prefill = worker("prefill", "http://p:1", 7000)
    decode = worker("decode", "http://d:2")
    req = prepare(GENERATE, {"text": ["a", "b", "c"]}, NO_LIMITS)
    body = pd_body(req, "r", Pair(prefill, decode), random.Random(0))
    assert body["bootstrap_host"] == ["p"] * 3 and body["bootstrap_port"] == [7000] * 3
    assert len(set(body["bootstrap_room"])) == 3
    colocated = pd_body(req, "r", Pair(None, decode), random.Random(0))
    assert colocated == {"text": ["a", "b", "c"], "rid": "r"}


def test_retries_get_their_own_rid() -> None:
    assert attempt_rid("abc", 0) == "abc"
    assert attempt_rid("abc", 2) == "abc-retry2"
