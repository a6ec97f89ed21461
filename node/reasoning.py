"""Reasoning content: a thinking model's `<think>...</think>` apart from its answer.

`ReasoningSplitter` reads a request's output text as it streams and splits it into the reasoning
(inside the tags) and the content (after them). DeepSeek-R1's chat template opens the thinking in
the prompt, so its output starts inside it (`deepseek-r1`); Qwen3 and the like open it in the
output (`qwen3`: reasoning only when the output begins with `<think>`). A tag may arrive split
across deltas: text that could still be the start of one waits for the next delta.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
REASONING_PARSERS = ("deepseek-r1", "qwen3")


class ReasoningSplitter:
    def __init__(self, parser: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning_parser {parser!r} (use one of {', '.join(REASONING_PARSERS)})"
            )
        self.thinking = parser == "deepseek-r1"
        self.opening = True  # nothing shown yet: an opening tag may come first
        self.pending = ""
        self.trim = False  # a tag just passed: newlines right after it are not shown

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of the new text, as far as it can be told yet."""
        self.pending += text
        reasoning = content = ""
        if self.opening:
            head = self.pending.lstrip()
            if START.startswith(head) and len(head) < len(START):
                return "", ""  # could still be "<think>"
            if head.startswith(START):
                self.thinking, self.pending, self.trim = True, head[len(START) :], True
            self.opening = False
        if self.thinking:
            at = self.pending.find(END)
            if at < 0:
                cut = len(self.pending) - partial_suffix(self.pending, END)
                reasoning, self.pending = self.pending[:cut], self.pending[cut:]
                return self._trimmed(reasoning), ""
            reasoning = self._trimmed(self.pending[:at])
            self.pending = self.pending[at + len(END) :]
            self.thinking, self.trim = False, True
        content, self.pending = self._trimmed(self.pending), ""
        return reasoning, content

    def _trimmed(self, text: str) -> str:
        if self.trim:
            text = text.lstrip("\n")
            self.trim = not text
        return text

    def flush(self) -> tuple[str, str]:
        """What is left at the end of the output (an unclosed thought stays reasoning)."""
        text, self.pending = self._trimmed(self.pending), ""
        if self.thinking:
            return text, ""
        return "", text


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split_reasoning(parser: str, text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole output."""
    splitter = ReasoningSplitter(parser)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.flush()
    return r1 + r2, c1 + c2
