"""The shared wire pieces in api/: OpenAI error shape, SSE encoding/decoding, request models."""

from __future__ import annotations

import json

import pytest

from api.chat import TemplateOptions
from api.errors import ApiError, from_body, invalid_request, rate_limited, server_error
from api.openai import ChatCompletionRequest, CompletionRequest, parse_request
from api.sse import DONE, DONE_PAYLOAD, SSEDecoder, encode_event, error_event, error_in

ERROR_KEYS = {"message", "type", "param", "code"}
USER = {"role": "user", "content": "x"}


def test_error_shape_and_types() -> None:
    assert invalid_request("bad", param="n").body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }
    assert server_error("down", 503).body()["error"]["type"] == "server_error"
    limited = rate_limited("busy")
    assert limited.status == 429 and limited.headers == {"Retry-After": "1"}
    assert set(limited.body()["error"]) == ERROR_KEYS


def test_from_body_reads_openai_and_other_shapes() -> None:
    e = from_body(400, {"error": {"message": "m", "type": "t", "param": "p", "code": 400}})
    # a numeric code (SGLang's nodes send them) comes back as a string, like all of ours
    assert (e.status, e.message, e.type, e.param, e.code) == (400, "m", "t", "p", "400")
    assert from_body(500, {"error": "plain"}).message == "plain"
    assert "HTTP 502" in from_body(502, "gateway timeout").message


def test_sse_encoding() -> None:
    assert encode_event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert encode_event(b'{"x":1}') == b'data: {"x":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    event = error_event(ApiError(502, "cut", code="upstream_error"))
    payload = event.removeprefix(b"data: ").strip()
    assert json.loads(payload)["error"]["code"] == "upstream_error"
    assert error_in(payload) == json.loads(payload)["error"]
    assert error_in(b'{"text":"no error here"}') is None
    assert error_in(b'{"text":"\\"error\\" in text"}') is None


def test_sse_decoder_reassembles_events_cut_anywhere() -> None:
    stream = b'data: {"i":0}\n\n: comment\n\nevent: x\ndata: {"i":1}\n\r\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        decoder = SSEDecoder()
        events = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert events == [b'{"i":0}', b'{"i":1}', DONE_PAYLOAD], cut
        assert decoder.pending == b""


def test_sse_decoder_joins_multiline_data() -> None:
    assert SSEDecoder().feed(b"data: a\ndata:b\n\n") == [b"a\nb"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": {"text": "x"}}, "prompt"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "x", "logprobs": 50}, "logprobs"),
        (
            {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
    ],
)
def test_completion_validation_names_the_field(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_request(CompletionRequest, body)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [USER], "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "messages": [USER], "max_completion_tokens": -2},
         "max_completion_tokens"),
    ],
)  # fmt: skip
def test_chat_validation_names_the_field(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_request(ChatCompletionRequest, body)
    assert info.value.param == param


def test_requests_keep_extensions_and_read_helpers() -> None:
    chat = parse_request(
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 9,
            "max_completion_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 2,
            "seed": 3,
            "stop": ["\n"],
            "top_k": 5,
        },
    )
    assert chat.output_limit == 7 and chat.include_usage and chat.messages[0].text == "hi"
    assert chat.model_extra == {"top_k": 5}
    done = parse_request(CompletionRequest, {"model": "m", "prompt": [[1, 2], [3]], "n": 2})
    # NOTE: an omitted max_tokens stays None here: the node makes it 16, at most the context's rest
    assert done.prompts == [[1, 2], [3]] and done.max_tokens is None
    assert parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2]}).prompts == [[1, 2]]
    with pytest.raises(ApiError, match="JSON object"):
        parse_request(CompletionRequest, ["not", "an", "object"])


@pytest.mark.parametrize("value", [-1, 0])
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_too_few_tokens_say_at_least_one_and_name_the_param(name: str, value: int) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], name: value}
    bodies = [(ChatCompletionRequest, chat)]
    if name == "max_tokens":
        bodies.append((CompletionRequest, {"model": "m", "prompt": "x", name: value}))
    for model, body in bodies:
        with pytest.raises(ApiError) as info:
            parse_request(model, body)
        assert info.value.param == name
        assert (
            info.value.message == f"{name}: must be >= 1 (ask for at least one token) (got {value})"
        )


TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    ("model", "fields", "param", "says"),
    [
        (ChatCompletionRequest, {"messages": [{"role": "user"}]}, "messages[0]", "needs content"),
        (ChatCompletionRequest, {"messages": [USER, {"role": "assistant"}]}, "messages[1]",
         "needs content or tool_calls"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": [IMAGE]}]},
         "messages[0].content", "takes text only"),
        (ChatCompletionRequest, {"messages": [USER], "stream": "yes"}, "stream", "boolean"),
        (ChatCompletionRequest, {"messages": [USER], "ignore_eos": "maybe"}, "ignore_eos",
         "boolean"),
        (ChatCompletionRequest, {"messages": [USER], "logprobs": 1}, "logprobs", "boolean"),
        (ChatCompletionRequest, {"messages": [USER], "logit_bias": {"5": 101}}, "logit_bias",
         "[-100, 100]"),
        (ChatCompletionRequest, {"messages": [USER], "logit_bias": {"the": 1}}, "logit_bias",
         "token ids"),
        (CompletionRequest, {"prompt": "x", "suffix": "!"}, "suffix", "suffix is not supported"),
        (CompletionRequest, {"prompt": "x", "best_of": 2}, "best_of", "best_of must equal n"),
        (CompletionRequest, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs",
         "less than or equal to 20"),
        (CompletionRequest, {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs",
         "greater than or equal to 0"),
        (CompletionRequest, {"prompt": "x", "prompt_logprobs": 1, "stream": True},
         "prompt_logprobs", "not available when stream is true"),
        (ChatCompletionRequest, {"messages": [USER], "prompt_logprobs": 1.5}, "prompt_logprobs",
         "integer"),
        (CompletionRequest, {"prompt": "x", "echo": "true"}, "echo", "boolean"),
        (ChatCompletionRequest, {"messages": [USER], "continue_final_message": True},
         "continue_final_message", "add_generation_prompt: false"),
        (ChatCompletionRequest, {"messages": [USER], "chat_template_kwargs": "x"},
         "chat_template_kwargs", "dictionary"),
        (ChatCompletionRequest, {"messages": [USER], "chat_template_kwargs": {"tokenize": True}},
         "chat_template_kwargs", "'tokenize' cannot be set here"),
    ],
)  # fmt: skip
def test_what_the_server_cannot_honour_is_a_400_naming_the_field(
    model: type, fields: dict, param: str, says: str
) -> None:
    with pytest.raises(ApiError) as info:
        parse_request(model, {"model": "m", **fields})
    assert (info.value.status, info.value.param) == (400, param)
    assert says in info.value.message


def test_what_the_server_honours_passes() -> None:
    messages = [USER, {"role": "assistant", "tool_calls": [TOOL_CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "user", "content": [{"type": "text", "text": "and?"}]}]  # fmt: skip
    chat = parse_request(
        ChatCompletionRequest,
        {"model": "m", "messages": messages, "logit_bias": {"5": -100, "7": 100}},
    )
    assert chat.messages[1].content is None and chat.logit_bias == {"5": -100.0, "7": 100.0}
    done = parse_request(CompletionRequest, {"model": "m", "prompt": "x", "best_of": 3, "n": 3})
    assert done.best_of == 3
    assert parse_request(CompletionRequest, {"model": "m", "prompt": "x", "echo": True}).echo


def test_the_prompt_logprobs_a_request_needs() -> None:
    """lm-eval's echo with logprobs, vLLM's prompt_logprobs (the more of both), none in a
    stream but echo's (vLLM takes prompt_logprobs 0 there, and sends none)."""

    def top(model: type, **fields: object) -> int | None:
        body = {"model": "m", "prompt": "x", "messages": [USER], **fields}
        return parse_request(model, body).prompt_top

    assert top(CompletionRequest, echo=True, logprobs=1, max_tokens=1, temperature=0) == 1
    assert top(CompletionRequest, echo=True, logprobs=0, stream=True) == 0
    assert top(CompletionRequest, echo=True, logprobs=2, prompt_logprobs=5) == 5
    assert top(CompletionRequest, logprobs=2, prompt_logprobs=0) == 0
    assert top(CompletionRequest, logprobs=2) is top(CompletionRequest, echo=True) is None
    assert top(CompletionRequest, prompt_logprobs=0, stream=True) is None
    assert top(ChatCompletionRequest, prompt_logprobs=3) == 3
    assert top(ChatCompletionRequest, logprobs=True, top_logprobs=3) is None


def test_null_booleans_are_their_default() -> None:
    """OpenAI's schema (and vLLM) take null for stream, echo, chat logprobs and the stream
    options: false, as when left out; "yes" stays a 400."""
    nulls = {"stream": None, "echo": None}
    done = parse_request(CompletionRequest, {"model": "m", "prompt": "x", **nulls})
    assert (done.stream, done.echo) == (False, False)
    options = {"include_usage": None, "continuous_usage_stats": None}
    body = {"model": "m", "prompt": "x", "stream": True, "stream_options": options}
    assert parse_request(CompletionRequest, body).include_usage is False
    body = {"model": "m", "messages": [USER], "logprobs": None, "stream": None}
    chat = parse_request(ChatCompletionRequest, body)
    assert (chat.logprobs, chat.stream) == (False, False)


def test_vllm_chat_template_fields_and_continuous_usage() -> None:
    """vLLM's add_generation_prompt (null: true), continue_final_message and
    chat_template_kwargs become the encoder's TemplateOptions; continuous_usage_stats counts
    only beside include_usage, as in vLLM."""
    chat = parse_request(ChatCompletionRequest, {"model": "m", "messages": [USER]})
    assert chat.template_options() == TemplateOptions()
    body = {"model": "m", "messages": [USER], "add_generation_prompt": None}
    assert parse_request(ChatCompletionRequest, body).template_options().add_generation_prompt
    body = {
        "model": "m",
        "messages": [USER],
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    options = parse_request(ChatCompletionRequest, body).template_options()
    assert options == TemplateOptions(False, True, {"enable_thinking": False})
    for usage, continuous in [(True, True), (False, False)]:
        stream = {"include_usage": usage, "continuous_usage_stats": True}
        body = {"model": "m", "prompt": "x", "stream": True, "stream_options": stream}
        assert parse_request(CompletionRequest, body).continuous_usage is continuous
