"""A chat request's tools: validation, the constraint of "required" and named choices, the
parser a model's chat template picks, the message (reasoning, content, calls) of an output, and
the chat template seeing the tools."""

from __future__ import annotations

import json

import jsonschema
import pytest

from api.chat import chat_prompt_ids
from api.errors import ApiError
from api.openai import ChatCompletionRequest, parse_request
from node.tools import (
    ChoiceWriter,
    calls_schema,
    finish_reason,
    parser_for,
    tool_mode,
    with_tool_grammar,
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "maximum": 7}},
    "required": ["city"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now", "description": "the time"}},
]


def request(**kw) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, **kw}
    return parse_request(ChatCompletionRequest, body)


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope', not among"),
        ({"tools": None, "tool_choice": "required"}, "needs tools"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ],
)
def test_bad_tools_are_400s_naming_the_field(kw: dict, says: str) -> None:
    with pytest.raises(ApiError) as err:
        request(**kw)
    assert err.value.status == 400 and says in err.value.message


def test_modes_and_their_constraints() -> None:
    assert tool_mode(request(tool_choice="none"), "hermes") is None
    assert tool_mode(request(tools=None), "hermes") is None
    auto = tool_mode(request(), "llama3")
    assert auto is not None and (auto.fmt, auto.grammar) == ("llama3", None)
    named = tool_mode(request(tool_choice={"type": "function", "function": {"name": "now"}}), "x")
    assert named is not None and (named.fmt, named.name) == ("named", "now")
    assert named.grammar == ["json_schema", json.dumps({"type": "object"})]
    required = tool_mode(request(tool_choice="required"), "hermes")
    assert required is not None and required.grammar is not None
    schema = json.loads(required.grammar[1])
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "x"}},
                         {"name": "now", "parameters": {}}], schema)  # fmt: skip
    for bad in ([], [{"name": "get_weather", "parameters": {"days": 3}}],
                [{"name": "other", "parameters": {}}]):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert calls_schema(request(parallel_tool_calls=False))["maxItems"] == 1


def test_a_tool_constraint_beside_another_is_a_400() -> None:
    mode = tool_mode(request(tool_choice="required"), "hermes")
    assert with_tool_grammar({"max_tokens": 4}, mode)["grammar"] == mode.grammar
    with pytest.raises(ApiError, match="drop response_format"):
        with_tool_grammar({"grammar": ["json_object", ""]}, mode)


def test_the_template_picks_the_parser_unless_configured() -> None:
    assert parser_for("... <tool_call> ...", None) == "hermes"
    assert parser_for("{{'<｜tool▁calls▁begin｜>'}}", None) == "deepseek-v3"
    assert parser_for("<|python_tag|>", None) == "llama3"
    assert parser_for(None, None) == "hermes" and parser_for("x", "llama3") == "llama3"
    with pytest.raises(ValueError, match="unknown"):
        parser_for("x", "mistral")


def test_choice_writer_reasoning_then_calls_whole_and_streamed() -> None:
    mode = tool_mode(request(), "hermes")
    text = ('<think>the city</think>Checking.<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Oslo"}}\n</tool_call>')  # fmt: skip
    message = ChoiceWriter("qwen3", mode).message(text)
    assert (message.reasoning_content, message.content) == ("the city", "Checking.")
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city": "Oslo"}')
    ]
    writer, parts = ChoiceWriter("qwen3", mode), {"r": "", "c": "", "name": None, "args": ""}
    for i, ch in enumerate(text):
        delta = writer.delta(ch, final=i == len(text) - 1)
        parts["r"] += delta.reasoning_content or ""
        parts["c"] += delta.content or ""
        for call in delta.tool_calls or []:
            parts["name"] = call.function.name or parts["name"]
            parts["args"] += call.function.arguments
    assert parts == {"r": "the city", "c": "Checking.", "name": "get_weather",
                     "args": '{"city": "Oslo"}'}  # fmt: skip
    assert writer.streamed_calls and finish_reason("stop", True) == "tool_calls"
    assert finish_reason("length", True) == "length" and finish_reason("stop", False) == "stop"


def test_without_calls_the_text_is_the_content() -> None:
    message = ChoiceWriter(None, tool_mode(request(), "hermes")).message("Just words.")
    assert (message.content, message.tool_calls) == ("Just words.", None)


def test_the_chat_template_sees_tools_and_past_calls(tiny_tokenizer) -> None:
    tokenizer = tiny_tokenizer("qwen")
    req = request(
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    )  # fmt: skip
    text = tokenizer.decode(
        chat_prompt_ids(tokenizer, req.chat_messages(), tools=req.template_tools())
    )
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    plain = request(tools=None, messages=[{"role": "user", "content": "hi"}])
    assert "<tools>" not in tokenizer.decode(chat_prompt_ids(tokenizer, plain.chat_messages()))
