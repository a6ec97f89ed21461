"""Prompt sampling: lengths in range, shared-prefix groups, ShareGPT parsing, clear file errors."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.bench.datasets import DatasetError, DatasetSpec, load_tokenizer, read_sharegpt, sample

CONVERSATIONS = [
    {"conversations": [{"from": "human", "value": "What is a cat?"},
                       {"from": "gpt", "value": "A small furry animal that purrs."}]},
    {"conversations": [{"from": "human", "value": "only one turn"}]},
    {"conversation": [{"from": "human", "value": "Tell me about dogs please."},
                      {"from": "gpt", "value": "Dogs bark."}]},
]  # fmt: skip


def shared_prefix(texts: list[str]) -> str:
    first, last = min(texts), max(texts)
    n = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), len(first))
    return first[:n]


@pytest.fixture
def tok(tiny_tokenizer: Callable[[str], Any]) -> Any:
    return tiny_tokenizer("qwen")


@pytest.fixture
def sharegpt_file(tmp_path: Path) -> Path:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(CONVERSATIONS))
    return path


def test_random_lengths_are_drawn_from_the_range(tok: Any) -> None:
    spec = DatasetSpec("random-ids", 200, random_input_len=40, random_output_len=10,
                       random_range_ratio=0.5)  # fmt: skip
    rows = sample(spec, tok)
    assert len(rows) == 200
    assert {r.prompt_len for r in rows} <= set(range(20, 41))
    assert {r.output_len for r in rows} <= set(range(5, 11))
    assert min(r.prompt_len for r in rows) < 25 and max(r.prompt_len for r in rows) > 35
    assert all(isinstance(r.prompt, str) and r.prompt for r in rows)


def test_random_is_seeded(tok: Any) -> None:
    spec = DatasetSpec("random-ids", 5, random_input_len=16, random_output_len=4)
    assert sample(spec, tok) == sample(spec, tok)
    assert sample(spec, tok) != sample(dataclasses.replace(spec, seed=2), tok)


def test_range_ratio_one_fixes_lengths_and_tokenize_prompt_sends_ids(tok: Any) -> None:
    spec = DatasetSpec("random", 4, random_input_len=32, random_output_len=8,
                       random_range_ratio=1.0, tokenize_prompt=True)  # fmt: skip
    rows = sample(spec, tok)
    assert [(r.prompt_len, r.output_len) for r in rows] == [(32, 8)] * 4
    assert all(isinstance(r.prompt, list) and len(r.prompt) == 32 for r in rows)


def test_random_cuts_tokens_from_sharegpt_when_given(tok: Any, sharegpt_file: Path) -> None:
    spec = DatasetSpec("random", 3, path=str(sharegpt_file), random_input_len=50,
                       random_output_len=4, random_range_ratio=1.0, tokenize_prompt=True)  # fmt: skip
    source = {tuple(tok.encode(p)) for p, _ in read_sharegpt(str(sharegpt_file))}
    for row in sample(spec, tok):
        assert len(row.prompt) == 50
        assert any(tuple(row.prompt[: len(s)]) == s for s in source)  # repeated source prompt


def test_generated_shared_prefix_groups(tok: Any) -> None:
    spec = DatasetSpec("generated-shared-prefix", gsp_num_groups=3, gsp_prompts_per_group=4,
                       gsp_system_prompt_len=24, gsp_question_len=6, gsp_output_len=5)  # fmt: skip
    rows = sample(spec, tok)
    assert len(rows) == 12 and {r.output_len for r in rows} == {5}
    assert [r.group for r in rows] != sorted(r.group for r in rows)  # shuffled
    groups = {g: [r.prompt for r in rows if r.group == g] for g in range(3)}
    assert all(len(prompts) == 4 for prompts in groups.values())
    shared = {g: shared_prefix(prompts) for g, prompts in groups.items()}
    for g, prefix in shared.items():
        assert len(tok.encode(prefix)) >= 20  # the system prompt, give or take a merged token
        other = groups[(g + 1) % 3][0]
        assert len(shared_prefix([prefix, other])) < len(prefix) // 2
    for r in rows:
        assert r.prompt_len == len(tok.encode(r.prompt))


def test_sharegpt_takes_the_first_two_turns(tok: Any, sharegpt_file: Path) -> None:
    rows = sample(DatasetSpec("sharegpt", 10, path=str(sharegpt_file)), tok)
    assert sorted(r.prompt for r in rows) == ["Tell me about dogs please.", "What is a cat?"]
    for r in rows:
        answer = "Dogs bark." if "dogs" in r.prompt else "A small furry animal that purrs."
        assert (r.prompt_len, r.output_len) == (len(tok.encode(r.prompt)), len(tok.encode(answer)))
    fixed = sample(DatasetSpec("sharegpt", 1, path=str(sharegpt_file), sharegpt_output_len=7), tok)
    assert len(fixed) == 1 and fixed[0].output_len == 7


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ('{"conversations": []}', "expected a JSON list"),
        ('[{"turns": []}]', "entry 0 has no 'conversations' list"),
        ('[{"conversations": [{"value": 1}, {"value": "x"}]}]', "string 'value'"),
        ('[{"conversations": [{"value": "x"}]}]', "no conversation has two turns"),
    ],
)
def test_bad_sharegpt_files_name_the_problem(
    tok: Any, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        sample(DatasetSpec("sharegpt", 4, path=str(path)), tok)
    assert str(path) in str(err.value)


def test_load_tokenizer_reads_a_local_checkpoint(tiny_model: Path, tok: Any) -> None:
    assert load_tokenizer(str(tiny_model)).encode("hello world") == tok.encode("hello world")
    with pytest.raises(DatasetError, match="nothing is downloaded"):
        load_tokenizer("Qwen/Qwen3-8B")


@pytest.mark.parametrize("family", ["qwen", "deepseek"])
def test_random_text_prompts_re_tokenize_to_their_drawn_length(
    tiny_tokenizer: Callable[[str], Any], family: str
) -> None:
    """Random ids decode into text that encodes into other tokens (a byte-level BPE merges and
    splits them): each text prompt is made to encode back into its drawn length, as vLLM's
    random dataset does."""
    tok = tiny_tokenizer(family)
    spec = DatasetSpec("random", num_prompts=40, random_input_len=256, random_range_ratio=0.5)
    rows = sample(spec, tok)
    encoded = [len(tok.encode(r.prompt, add_special_tokens=False)) for r in rows]
    assert encoded == [r.prompt_len for r in rows]
    ids = sample(dataclasses.replace(spec, tokenize_prompt=True), tok)
    assert [r.prompt_len for r in rows] == [r.prompt_len for r in ids]  # the drawn lengths
