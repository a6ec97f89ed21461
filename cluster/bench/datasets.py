"""The prompts of a run, as SGLang's bench_serving draws them (seeded, so runs repeat).

- `random-ids`: prompts of random token ids; input lengths in [max(L*r, 1), L], output
  lengths in [L*r, L] (L: --random-input-len / --random-output-len, r: --random-range-ratio).
  Sent as text, a prompt is made to re-tokenize into its drawn length (random ids decode into
  text that encodes into other tokens: with a byte-level BPE, 256 ids became 265-445 tokens);
  the server may still add its BOS token.
- `random`: the same lengths, the tokens cut from ShareGPT prompts (--dataset-path); without a
  file (nothing is downloaded here) it draws random ids, as `random-ids` does.
- `sharegpt`: the first two turns of ShareGPT conversations: prompt and reference answer (its
  token count is the output length unless --sharegpt-output-len fixes one).
- `generated-shared-prefix`: --gsp-num-groups system prompts, each shared by
  --gsp-prompts-per-group questions, shuffled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHAREGPT_FORMAT = '[{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}]'


class DatasetError(ValueError):
    """The dataset cannot be read or sampled; the message says what to change."""


@dataclass(frozen=True)
class DatasetRow:
    prompt: str | list[int]  # token ids only with --tokenize-prompt
    prompt_len: int
    output_len: int
    group: int | None = None  # generated-shared-prefix: which system prompt it starts with


@dataclass(frozen=True)
class DatasetSpec:
    """What to draw; the names are the flags' (cli.py builds it from them)."""

    name: str = "random"
    num_prompts: int = 1000
    path: str = ""
    random_input_len: int = 1024
    random_output_len: int = 1024
    random_range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    sharegpt_context_len: int | None = None
    gsp_num_groups: int = 64
    gsp_prompts_per_group: int = 16
    gsp_system_prompt_len: int = 2048
    gsp_question_len: int = 128
    gsp_output_len: int = 256
    apply_chat_template: bool = False
    tokenize_prompt: bool = False
    seed: int = 1


def load_tokenizer(path: str) -> Any:
    """A transformers tokenizer from a local checkpoint directory (never the network)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise DatasetError(
            f"--tokenizer {path}: not a directory; give a local checkpoint directory "
            "(with tokenizer.json or tokenizer_config.json): nothing is downloaded"
        )
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"--tokenizer {path}: no tokenizer loads from it ({exc})") from None


def sample(spec: DatasetSpec, tokenizer: Any) -> list[DatasetRow]:
    """The rows of `spec.name`, drawn with `spec.seed`."""
    rng = np.random.default_rng(spec.seed)
    if spec.name == "sharegpt":
        return sample_sharegpt(spec, tokenizer, rng)
    if spec.name in ("random", "random-ids"):
        source = None
        if spec.name == "random" and spec.path:
            pairs = read_sharegpt(spec.path)
            source = [tokenizer.encode(pairs[i][0]) for i in rng.permutation(len(pairs))]
        return sample_random(spec, tokenizer, rng, source)
    if spec.name == "generated-shared-prefix":
        return sample_shared_prefix(spec, tokenizer, rng)
    raise DatasetError(
        f"unknown dataset {spec.name!r} (random, random-ids, sharegpt, generated-shared-prefix)"
    )


def read_sharegpt(path: str) -> list[tuple[str, str]]:
    """(first turn, second turn) of every conversation with at least two turns."""
    file = Path(path)
    if not path or not file.is_file():
        raise DatasetError(
            f"--dataset-path {path!r}: no such file; give a ShareGPT-format JSON file "
            f"({SHAREGPT_FORMAT}); nothing is downloaded here"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"--dataset-path {path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise DatasetError(f"--dataset-path {path}: expected a JSON list like {SHAREGPT_FORMAT}")
    pairs = [pair for i, entry in enumerate(data) if (pair := first_turns(entry, path, i))]
    if not pairs:
        raise DatasetError(f"--dataset-path {path}: no conversation has two turns")
    return pairs


def first_turns(entry: Any, path: str, index: int) -> tuple[str, str] | None:
    turns = None
    if isinstance(entry, dict):
        turns = entry.get("conversations", entry.get("conversation"))
    if not isinstance(turns, list):
        raise DatasetError(
            f"--dataset-path {path}: entry {index} has no 'conversations' list "
            f"(expected {SHAREGPT_FORMAT})"
        )
    if len(turns) < 2:
        return None
    values = [t.get("value") if isinstance(t, dict) else None for t in turns[:2]]
    if not all(isinstance(v, str) for v in values):
        raise DatasetError(
            f"--dataset-path {path}: entry {index}: each turn needs a string 'value' "
            f"(expected {SHAREGPT_FORMAT})"
        )
    return values[0], values[1]


def sample_sharegpt(
    spec: DatasetSpec, tokenizer: Any, rng: np.random.Generator
) -> list[DatasetRow]:
    fixed = spec.sharegpt_output_len
    if fixed is not None and fixed < 2:
        raise DatasetError(f"--sharegpt-output-len {fixed}: give at least 2")
    pairs = read_sharegpt(spec.path)
    rows: list[DatasetRow] = []
    for i in rng.permutation(len(pairs)):
        if len(rows) == spec.num_prompts:
            break
        prompt, answer = pairs[i]
        if spec.apply_chat_template:
            prompt = chat_prompt(tokenizer, prompt)
        prompt_len = len(tokenizer.encode(prompt))
        output_len = len(tokenizer.encode(answer)) if fixed is None else fixed
        too_long = spec.sharegpt_context_len and prompt_len + output_len > spec.sharegpt_context_len
        if prompt_len >= 2 and output_len >= 2 and not too_long:
            rows.append(DatasetRow(prompt, prompt_len, output_len))
    return rows


def chat_prompt(tokenizer: Any, text: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError("--apply-chat-template: the tokenizer has no chat template")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    # NOTE: the server adds the bos token itself when it tokenizes (SGLang strips it too).
    return prompt.replace(tokenizer.bos_token, "") if tokenizer.bos_token else prompt


def drawn_lengths(spec: DatasetSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Input lengths in [max(L*r, 1), L] and output lengths in [L*r, L]."""
    n, ratio = spec.num_prompts, spec.random_range_ratio
    if not 0.0 <= ratio <= 1.0:
        raise DatasetError(f"--random-range-ratio {ratio}: give a number in [0, 1]")
    low_in = max(int(spec.random_input_len * ratio), 1)
    inputs = rng.integers(low_in, spec.random_input_len + 1, size=n)
    low_out = int(spec.random_output_len * ratio)
    outputs = rng.integers(low_out, spec.random_output_len + 1, size=n)
    return inputs, outputs


def sample_random(
    spec: DatasetSpec,
    tokenizer: Any,
    rng: np.random.Generator,
    source: Sequence[list[int]] | None = None,
) -> list[DatasetRow]:
    """Prompts of exactly the drawn token counts (before the server re-tokenizes the text)."""
    if spec.random_input_len < 1 or spec.random_output_len < 0:
        raise DatasetError("--random-input-len must be >= 1 and --random-output-len >= 0")
    inputs, outputs = drawn_lengths(spec, rng)
    source = [ids for ids in source or () if ids]
    offsets = rng.integers(0, tokenizer.vocab_size, size=spec.num_prompts)
    rows = []
    for i, (n_in, n_out) in enumerate(zip(inputs.tolist(), outputs.tolist())):
        if source:
            ids = source[i % len(source)]
            ids = (ids * (n_in // len(ids) + 1))[:n_in]
        else:
            ids = [(int(offsets[i]) + i + j) % tokenizer.vocab_size for j in range(n_in)]
        if spec.tokenize_prompt:
            rows.append(DatasetRow(ids, n_in, n_out))
        else:
            rows.append(DatasetRow(*text_of_length(tokenizer, ids, n_in), n_out))
    return rows


def text_of_length(tokenizer: Any, ids: list[int], n: int, rounds: int = 8) -> tuple[str, int]:
    """Text that the tokenizer encodes back into `n` tokens (special tokens aside), and the
    count it does encode into, as vLLM's random dataset makes it: random ids decode into text
    that re-tokenizes into more (or fewer) tokens, so re-encode, cut or extend the ids (from a
    fixed filler) and decode again, a few rounds."""
    text = tokenizer.decode(ids)
    for _ in range(rounds):
        again = tokenizer.encode(text, add_special_tokens=False)
        if len(again) == n:
            return text, n
        again = again[:n] if len(again) > n else again + ids[: n - len(again)]
        text = tokenizer.decode(again)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def sample_shared_prefix(
    spec: DatasetSpec, tokenizer: Any, rng: np.random.Generator
) -> list[DatasetRow]:
    def text(n: int) -> str:
        return tokenizer.decode(rng.integers(0, tokenizer.vocab_size, size=n).tolist())

    systems = [text(spec.gsp_system_prompt_len) for _ in range(spec.gsp_num_groups)]
    rows = []
    for group, system in enumerate(systems):
        for _ in range(spec.gsp_prompts_per_group):
            prompt = f"{system}\n\n{text(spec.gsp_question_len)}"
            rows.append(
                DatasetRow(prompt, len(tokenizer.encode(prompt)), spec.gsp_output_len, group)
            )
    return [rows[i] for i in rng.permutation(len(rows))]
