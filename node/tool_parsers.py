"""Tool calls in a model's output text, read whole or as it streams.

Each format's `view` reads the text so far into the content before the calls and the calls, each
a name (once whole) and its arguments as written so far. The views only ever grow: content that
could still be the start of a call marker is held back, and arguments are the raw JSON the model
wrote. `ToolCallStream` turns successive views into OpenAI deltas (a call's name first, with its
id, then its arguments in pieces); a whole answer is the same stream fed once.

Formats, picked per model (node/tools.py) or by config (`tool_call_parser`):
- `hermes` (Qwen2.5/Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
- `llama3` (Llama 3.1+ JSON tool calls): the output is `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`, several joined by `;`.
- `deepseek-v3`: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`, the
  arguments in a ```json fence, `<｜tool▁call▁end｜>`, ..., `<｜tool▁calls▁end｜>`.
Two more read constrained output (tool_choice "required" or a named function): `required`, a JSON
array of `{"name": ..., "parameters": {...}}`, and `named`, the arguments object alone.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from node.json_scan import ObjectScan, scan_object, skip_space, value_end
from node.reasoning import partial_suffix

TOOL_PARSERS = ("hermes", "llama3", "deepseek-v3")
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
DS_CALLS = "<｜tool▁calls▁begin｜>"
DS_CALL, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
DS_FENCE = "```json\n"


@dataclass(frozen=True)
class CallView:
    name: str | None  # None until the name is whole
    arguments: str  # raw JSON as written so far
    done: bool


@dataclass(frozen=True)
class View:
    content: str
    calls: tuple[CallView, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    arguments: str
    id: str | None = None  # with the name, on a call's first delta
    name: str | None = None


def content_only(text: str, marker: str, final: bool) -> View:
    return View(text if final else text[: len(text) - partial_suffix(text, marker)])


def object_call(scan: ObjectScan, args_keys: tuple[str, ...]) -> CallView:
    """A call written as one JSON object with its name and arguments members."""
    raw = next((r for k in args_keys if (r := scan.raw(k)) is not None), None)
    if raw is None:
        raw = "{}" if scan.end is not None else ""
    return CallView(scan.string("name"), raw, scan.end is not None)


def hermes_view(text: str, final: bool) -> View:
    first = at = text.find(HERMES_START)
    if at < 0:
        return content_only(text, HERMES_START, final)
    calls = []
    while at >= 0:
        scan = scan_object(text, at + len(HERMES_START))
        calls.append(object_call(scan, ("arguments", "parameters")))
        if scan.end is None:
            break
        close = text.find(HERMES_END, scan.end)
        at = -1 if close < 0 else text.find(HERMES_START, close)
    return View(text[:first], tuple(calls))


def llama3_view(text: str, final: bool) -> View:
    start = skip_space(text, 0)
    head = text[start:]
    if head.startswith(PYTHON_TAG):
        start += len(PYTHON_TAG)
    elif not head.startswith("{"):
        if not final and PYTHON_TAG.startswith(head):
            return View("")  # nothing yet, or what may become the tag
        return View(text)
    calls, at = [], start
    while True:
        scan = scan_object(text, at)
        calls.append(object_call(scan, ("parameters", "arguments")))
        if scan.end is None:
            break
        at = skip_space(text, scan.end)
        if not text.startswith(";", at):
            break
        at += 1
    return View("", tuple(calls))


def deepseek_view(text: str, final: bool) -> View:
    at = text.find(DS_CALLS)
    if at < 0:
        return content_only(text, DS_CALLS, final)
    calls, pos = [], at + len(DS_CALLS)
    while (begin := text.find(DS_CALL, pos)) >= 0:
        sep = text.find(DS_SEP, begin)
        newline = -1 if sep < 0 else text.find("\n", sep)
        if newline < 0:
            break  # the name is not whole yet
        name = text[sep + len(DS_SEP) : newline].strip()
        body = text[newline + 1 :]
        if not body.startswith(DS_FENCE):
            calls.append(CallView(name, "", False))
            break
        start = newline + 1 + len(DS_FENCE)
        end = value_end(text, start)
        calls.append(
            CallView(name, text[start : len(text) if end is None else end], end is not None)
        )
        close = -1 if end is None else text.find(DS_CALL_END, end)
        if close < 0:
            break
        pos = close + len(DS_CALL_END)
    return View(text[:at], tuple(calls))


def required_view(text: str, final: bool) -> View:
    """A JSON array of {"name": ..., "parameters": {...}} (tool_choice "required")."""
    at = skip_space(text, 0)
    if not text.startswith("[", at):
        return View("")
    calls, at = [], skip_space(text, at + 1)
    while text.startswith("{", at):
        scan = scan_object(text, at)
        calls.append(object_call(scan, ("parameters", "arguments")))
        if scan.end is None:
            break
        at = skip_space(text, scan.end)
        if not text.startswith(",", at):
            break
        at = skip_space(text, at + 1)
    return View("", tuple(calls))


def named_view(name: str) -> Callable[[str, bool], View]:
    """The arguments object alone (tool_choice naming a function)."""

    def view(text: str, final: bool) -> View:
        start = skip_space(text, 0)
        if start >= len(text):
            return View("")
        end = value_end(text, start)
        args = text[start : len(text) if end is None else end]
        return View("", (CallView(name, args, end is not None),))

    return view


VIEWS: dict[str, Callable[[str, bool], View]] = {
    "hermes": hermes_view,
    "llama3": llama3_view,
    "deepseek-v3": deepseek_view,
    "required": required_view,
}


def view_of(fmt: str, name: str | None = None) -> Callable[[str, bool], View]:
    if fmt == "named":
        assert name is not None
        return named_view(name)
    if fmt not in VIEWS:
        raise ValueError(f"unknown tool_call_parser {fmt!r} (use one of {', '.join(TOOL_PARSERS)})")
    return VIEWS[fmt]


@dataclass
class ToolCallStream:
    """One choice's output text in, content and tool-call deltas out."""

    view: Callable[[str, bool], View]
    text: str = ""
    content_sent: int = 0
    args_sent: list[int] = field(default_factory=list)  # per call whose name was sent
    ids: list[str] = field(default_factory=list)

    def feed(self, piece: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """(content, tool-call deltas) the new text makes known; `final` at the output's end
        (what was held back as a possible marker is content then)."""
        self.text += piece
        view = self.view(self.text, final)
        if final and not any(c.name for c in view.calls):
            view = View(self.text)  # no call after all: all of it was content
        content = view.content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(view.content))
        deltas = []
        for index, call in enumerate(view.calls):
            if call.name is None:
                break  # the name goes first
            if index == len(self.args_sent):
                self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self.args_sent.append(len(call.arguments))
                deltas.append(ToolCallDelta(index, call.arguments, self.ids[index], call.name))
            elif len(call.arguments) > self.args_sent[index]:
                deltas.append(ToolCallDelta(index, call.arguments[self.args_sent[index] :]))
                self.args_sent[index] = len(call.arguments)
        return content, deltas

    @property
    def called(self) -> bool:
        return bool(self.args_sent)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str


def whole_calls(
    fmt: str, text: str, names: frozenset[str], name: str | None = None
) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole output. A model's free-form call (hermes, llama3,
    deepseek-v3) that names no offered tool or whose arguments are not a JSON object leaves
    the whole text as content, as if no call had been made."""
    stream = ToolCallStream(view_of(fmt, name))
    content, deltas = stream.feed(text, final=True)
    calls = [ToolCall(d.id or "", d.name or "", d.arguments) for d in deltas]
    if fmt in TOOL_PARSERS and not all(valid_call(c, names) for c in calls):
        return text, []
    return content, calls


def valid_call(call: ToolCall, names: frozenset[str]) -> bool:
    try:
        args = json.loads(call.arguments)
    except ValueError:
        return False
    return call.name in names and isinstance(args, dict)
