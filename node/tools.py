"""A chat request's tools, and one choice's output as an assistant message.

`tool_mode` reads `tools` and `tool_choice`: with "auto" the model's text is parsed in the model's
format; with "required" or a named function decoding is constrained by a JSON schema (a grammar,
engine/grammar.py), so the arguments always validate against the function's `parameters`, and
the constrained JSON is read back as calls. "none" leaves the text alone.

`ChoiceWriter` turns one choice's text, whole or delta by delta, into the message parts: the
reasoning apart (node/reasoning.py), then tool calls apart from the content
(node/tool_parsers.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from api.errors import invalid_request
from api.openai import ChatCompletionRequest, FunctionCall, ToolCall
from api.openai_responses import DeltaFunction, DeltaMessage, DeltaToolCall, ResponseMessage
from node.reasoning import ReasoningSplitter
from node.tool_parsers import TOOL_PARSERS, ToolCallDelta, ToolCallStream, view_of, whole_calls

log = logging.getLogger(__name__)

# What in a chat template says which format the model calls tools in.
TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"),
    ("tool▁calls▁begin", "deepseek-v3"),
    ("<|python_tag|>", "llama3"),
)


def parser_for(template: str | None, configured: str | None) -> str:
    """The tool-call format: the configured one, else the one the chat template writes, else
    hermes (the most common)."""
    if configured is not None:
        if configured not in TOOL_PARSERS:
            raise ValueError(
                f"tool_call_parser {configured!r} is unknown (use one of {', '.join(TOOL_PARSERS)})"
            )
        return configured
    found = [fmt for marker, fmt in TEMPLATE_MARKERS if marker in (template or "")]
    return found[0] if found else "hermes"


@dataclass(frozen=True)
class ToolMode:
    fmt: str  # a TOOL_PARSERS format, "required" or "named"
    names: frozenset[str]
    name: str | None = None  # the function a named tool_choice forces
    grammar: list[str] | None = None  # the constraint of "required" and named choices


def tool_mode(req: ChatCompletionRequest, parser: str) -> ToolMode | None:
    """How a request's tool calls are made and read; None when there are none to read."""
    if not req.tools or req.tool_choice == "none":
        return None
    names = frozenset(t.function.name for t in req.tools)
    forced = req.forced_tool
    if forced is not None:
        spec = next(t.function for t in req.tools if t.function.name == forced)
        schema = spec.parameters or {"type": "object"}
        return ToolMode("named", names, forced, ["json_schema", json.dumps(schema)])
    if req.tool_choice == "required":
        return ToolMode("required", names, None, ["json_schema", json.dumps(calls_schema(req))])
    return ToolMode(parser, names)


def calls_schema(req: ChatCompletionRequest) -> dict[str, Any]:
    """A JSON array of one call or more, each naming an offered function with arguments that
    validate against its parameters; one call only when parallel_tool_calls is false."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "parameters": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in req.tools or []
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def with_tool_grammar(params: dict[str, Any], mode: ToolMode | None) -> dict[str, Any]:
    """The sampling params with the tool constraint added; a 400 beside another constraint."""
    if mode is None or mode.grammar is None:
        return params
    if "grammar" in params:
        raise invalid_request(
            "tool_choice 'required' or a named function constrains the output already: "
            "drop response_format (or json_schema, regex, ebnf)",
            param="tool_choice",
        )
    return {**params, "grammar": mode.grammar}


@dataclass
class ChoiceWriter:
    """One choice's output text -> reasoning, content and tool calls."""

    reasoning: str | None
    tools: ToolMode | None
    splitter: ReasoningSplitter | None = field(init=False)
    calls: ToolCallStream | None = field(init=False)

    def __post_init__(self) -> None:
        self.splitter = ReasoningSplitter(self.reasoning) if self.reasoning else None
        self.calls = None
        if self.tools is not None:
            self.calls = ToolCallStream(view_of(self.tools.fmt, self.tools.name))

    def delta(self, text: str, final: bool) -> DeltaMessage:
        """The message parts `text` (the next piece of the output) adds; `final` at the end."""
        thought, content = self._split(text, final)
        calls: list[ToolCallDelta] = []
        if self.calls is not None:
            content, calls = self.calls.feed(content, final)
        return DeltaMessage(
            content=content or None,
            reasoning_content=thought or None,
            tool_calls=[delta_call(c) for c in calls] or None,
        )

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self.splitter is None:
            return "", text
        thought, content = self.splitter.feed(text)
        if final:
            rest = self.splitter.flush()
            thought, content = thought + rest[0], content + rest[1]
        return thought, content

    def message(self, text: str) -> ResponseMessage:
        """The message of a whole output."""
        thought, content = self._split(text, True)
        calls = []
        if self.tools is not None:
            tools = self.tools
            content, calls = whole_calls(tools.fmt, content, tools.names, tools.name)
        return ResponseMessage(
            content=content if content or not calls else None,
            reasoning_content=thought or None,
            tool_calls=[
                ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in calls
            ]
            or None,
        )

    @property
    def streamed_calls(self) -> bool:
        return self.calls is not None and self.calls.called


def finish_reason(reason: str | None, called: bool) -> str | None:
    """A choice that ended (stop) with tool calls ends with "tool_calls"."""
    return "tool_calls" if reason == "stop" and called else reason


def delta_call(call: ToolCallDelta) -> DeltaToolCall:
    first = call.name is not None
    return DeltaToolCall(
        index=call.index,
        id=call.id,
        type="function" if first else None,
        function=DeltaFunction(name=call.name, arguments=call.arguments),
    )
