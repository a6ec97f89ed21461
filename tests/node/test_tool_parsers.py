"""Tool-call parsing on fixed texts, for each format: whole, streamed a character at a time, and
streamed in two pieces cut at every place. A stream says each call's name (with its id) before
any of its arguments, and its pieces add up to what the whole parse finds."""

from __future__ import annotations

import json

import pytest

from node.json_scan import scan_object, value_end
from node.tool_parsers import ToolCallDelta, ToolCallStream, view_of, whole_calls

NAMES = frozenset({"get_weather", "add"})
WEATHER = '{"city": "Paris \\"9e\\" }{", "days": [1, 2]}'
ADD = '{"a": -1.5e3, "b": {"c": null, "d": true}}'
TEXTS = {
    "hermes": (
        f'Let me look.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n'
        f'</tool_call>\n<tool_call>\n{{"arguments": {ADD}, "name": "add"}}\n</tool_call>'
    ),
    "llama3": (
        f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}; '
        f'{{"name": "add", "parameters": {ADD}}}'
    ),
    "deepseek-v3": (
        "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather"
        f"\n```json\n{WEATHER}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function"
        f"<｜tool▁sep｜>add\n```json\n{ADD}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    ),
    "required": (
        f'[{{"name": "get_weather", "parameters": {WEATHER}}}, '
        f'{{"name": "add", "parameters": {ADD}}}]'
    ),
}
CONTENT = {"hermes": "Let me look.\n", "llama3": "", "deepseek-v3": "Let me look.", "required": ""}


def streamed(fmt: str, pieces: list[str], name: str | None = None) -> tuple[str, list]:
    """(content, [(name, arguments)]) from a stream of `pieces`, checking the deltas' order."""
    stream = ToolCallStream(view_of(fmt, name))
    content, calls = "", []
    for i, piece in enumerate(pieces):
        text, deltas = stream.feed(piece, final=i == len(pieces) - 1)
        content += text
        for d in deltas:
            add_delta(calls, d)
    return content, [(n, a) for _, n, a in calls]


def add_delta(calls: list, delta: ToolCallDelta) -> None:
    if delta.name is not None:  # a call's first delta: its id and name
        assert delta.index == len(calls) and delta.id and delta.id.startswith("call_")
        calls.append([delta.id, delta.name, ""])
    else:
        assert delta.id is None and delta.index < len(calls)
    calls[delta.index][2] += delta.arguments


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_each_format_whole_and_streamed_at_every_cut(fmt: str) -> None:
    text = TEXTS[fmt]
    content, calls = whole_calls(fmt, text, NAMES)
    assert content == CONTENT[fmt]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", WEATHER), ("add", ADD)]
    assert all(json.loads(c.arguments) for c in calls) and len({c.id for c in calls}) == 2
    want = (content, [(c.name, c.arguments) for c in calls])
    assert streamed(fmt, list(text)) == want
    for cut in range(1, len(text)):
        assert streamed(fmt, [text[:cut], text[cut:]]) == want, cut


def test_named_choice_reads_the_arguments_alone() -> None:
    content, calls = whole_calls("named", WEATHER, NAMES, "get_weather")
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", WEATHER)]
    assert streamed("named", list(WEATHER), "get_weather") == ("", [("get_weather", WEATHER)])


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("hermes", "No call here, only a <tool_ that is not one"),
        ("hermes", '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>'),
        ("hermes", '<tool_call>{"name": "add", "arguments": "not an object"}</tool_call>'),
        ("hermes", '<tool_call>{"name": "add", "arguments": {"a": </tool_call>'),
        ("llama3", 'The answer is {"a": 1}'),
        ("llama3", '{"answer": 42}'),
        ("deepseek-v3", "Plain text with <｜tool▁calls▁ in the middle"),
    ],
)
def test_what_is_no_call_stays_content(fmt: str, text: str) -> None:
    assert whole_calls(fmt, text, NAMES) == (text, [])


@pytest.mark.parametrize("fmt", ["hermes", "deepseek-v3"])
def test_a_partial_marker_is_held_until_it_is_told_apart(fmt: str) -> None:
    text = "Hello <｜tool▁calls" if fmt == "deepseek-v3" else "Hello <tool"
    stream = ToolCallStream(view_of(fmt))
    assert stream.feed(text) == ("Hello ", [])
    assert stream.feed("s are fun", final=True) == (text[6:] + "s are fun", [])


def test_llama3_decides_at_the_first_character() -> None:
    stream = ToolCallStream(view_of("llama3"))
    assert stream.feed("  <|python") == ("", [])
    _, deltas = stream.feed('_tag|>{"name": "add", "parameters": {"a"')
    assert [(d.name, d.arguments) for d in deltas] == [("add", '{"a"')]
    assert ToolCallStream(view_of("llama3")).feed("Sure, ") == ("Sure, ", [])


def test_json_spans() -> None:
    assert value_end('"a\\"b" rest', 0) == 6
    assert value_end('{"a": [1, "]"]}', 0) == 15
    assert value_end('{"a": [1, "]"', 0) is None
    assert value_end("12", 0) is None and value_end("12,", 0) == 2
    scan = scan_object('{"name": "add", "arguments": {"x": 1', 0)
    assert scan.string("name") == "add" and scan.raw("arguments") == '{"x": 1' and scan.end is None
    assert scan_object("[1]", 0).bad and scan_object("{}", 0).end == 2
