"""`<think>...</think>` apart from the answer, however the output is cut into deltas."""

from __future__ import annotations

import pytest

from node.reasoning import ReasoningSplitter, split_reasoning
from node.settings import NodeSettings

CASES = [
    ("qwen3", "<think>\nLet me see</think>\n\nThe answer is 4.", ("Let me see", "The answer is 4.")),
    ("qwen3", "  <think></think>x", ("", "x")),
    ("qwen3", "plain <think> answer", ("", "plain <think> answer")),
    ("qwen3", "<thi", ("", "<thi")),
    ("deepseek-r1", "hmm\n</think>\n\nok</think>", ("hmm\n", "ok</think>")),
    ("deepseek-r1", "never closed </thin", ("never closed </thin", "")),
]  # fmt: skip


@pytest.mark.parametrize(("parser", "text", "want"), CASES)
def test_any_cut_into_three_deltas_splits_alike(parser: str, text: str, want) -> None:
    assert split_reasoning(parser, text) == want
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1):
            s = ReasoningSplitter(parser)
            parts = [s.feed(text[:a]), s.feed(text[a:b]), s.feed(text[b:]), s.flush()]
            assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == want


def test_unknown_parsers_are_refused() -> None:
    with pytest.raises(ValueError, match="reasoning_parser 'r2' is unknown"):
        NodeSettings(role="decode", model="m", reasoning_parser="r2")
