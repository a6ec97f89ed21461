"""Reading JSON that is still arriving: where a value ends, and an object's members so far.

Tool calls stream as raw JSON text inside a model's output. To say a call's name as soon as it is
whole, and to pass its arguments on piece by piece exactly as the model wrote them, the parser
needs spans, not parsed values: `value_end` says where a value ends (None: the text ends first),
and `scan_object` lists an object's members as (start, end) spans of their values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

WHITESPACE = " \t\r\n"


def skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def string_end(text: str, i: int) -> int | None:
    """The end (past the closing quote) of the string whose opening quote is at `i`."""
    j = i + 1
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == '"':
            return j + 1
        j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """The end of the JSON value starting at `i`; None while the text ends inside it (a number
    or literal at the very end counts as unfinished: more digits may follow)."""
    if i >= len(text):
        return None
    if text[i] == '"':
        return string_end(text, i)
    if text[i] not in "{[":
        j = i
        while j < len(text) and text[j] not in ",}]" + WHITESPACE:
            j += 1
        return j if j < len(text) else None
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == '"':
            end = string_end(text, j)
            if end is None:
                return None
            j = end
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


@dataclass
class ObjectScan:
    """An object's members so far: key -> (value start, value end or None while unfinished).
    `end` is past the closing brace once the object is whole; `bad` when the text is not an
    object (or not JSON) where it was scanned."""

    text: str
    members: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None
    bad: bool = False

    def string(self, key: str) -> str | None:
        """A whole string member's value; None while it is unfinished, absent or not a string."""
        start, end = self.members.get(key, (0, None))
        if end is None:
            return None
        value = json.loads(self.text[start:end])
        return value if isinstance(value, str) else None

    def raw(self, key: str) -> str | None:
        """A member's value as written so far (None: no such member yet)."""
        if key not in self.members:
            return None
        start, end = self.members[key]
        return self.text[start : len(self.text) if end is None else end]


def scan_object(text: str, i: int) -> ObjectScan:
    """The members of the object starting at `i` (after optional whitespace), as far as the text
    goes."""
    scan = ObjectScan(text)
    i = skip_space(text, i)
    if i >= len(text):
        return scan
    if text[i] != "{":
        scan.bad = True
        return scan
    i = skip_space(text, i + 1)
    while i < len(text):
        if text[i] == "}" and not scan.members:
            scan.end = i + 1
            return scan
        if text[i] != '"':
            scan.bad = True
            return scan
        key_end = string_end(text, i)
        if key_end is None:
            return scan
        key = json.loads(text[i:key_end])
        i = skip_space(text, key_end)
        if i >= len(text):
            return scan
        if text[i] != ":":
            scan.bad = True
            return scan
        start = skip_space(text, i + 1)
        end = value_end(text, start)
        scan.members[key] = (start, end)
        if end is None:
            return scan
        i = skip_space(text, end)
        if i >= len(text):
            return scan
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] != ",":
            scan.bad = True
            return scan
        i = skip_space(text, i + 1)
    return scan
