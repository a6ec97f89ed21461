"""A prompt's logprobs in each API's shape, from the `TokenOutput` of the job that computed them
(engine/prompt_logprobs.py): position i's logprob, rank and best tokens at entry i - 1; the
first prompt token has none.

- OpenAI completions, `echo` with `logprobs`: the prompt's tokens lead each choice's logprobs
  (`echo_entries`), `null` first, as OpenAI's legacy API and vLLM answer lm-eval-harness.
- vLLM's `prompt_logprobs`: `[null, {"<token id>": {"logprob", "rank", "decoded_token"}}, ...]`,
  the prompt's token first, then the best ones (`vllm_prompt_logprobs`).
- SGLang's /generate, `return_logprob` with `logprob_start_len`: `input_token_logprobs` as
  `[logprob, token id, text or null]` from that position on, the first `null` (as SGLang does
  for any start), and `input_top_logprobs` when `top_logprobs_num` > 0 (`sglang_input_logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from api.openai_responses import PromptLogprobs
from node.messages import TokenOutput

TokenText = Callable[[int], str]
LOWEST_LOGPROB = -9999.0  # what vLLM reports for -inf (JSON has no infinity)


@dataclass(frozen=True)
class Entries:
    """Tokens as a completion's logprobs list them: id, logprob (None: the first prompt token),
    best (id, logprob) pairs."""

    ids: list[int]
    logprobs: list[float | None]
    tops: list[Sequence[Sequence[float]] | None]

    def __add__(self, other: Entries) -> Entries:
        return Entries(self.ids + other.ids, self.logprobs + other.logprobs, self.tops + other.tops)


def has_prompt_logprobs(out: TokenOutput, prompt: Sequence[int]) -> bool:
    """Whether `out` carries `prompt`'s logprobs, from entry `out.prompt_logprobs_first` on (a
    moved stream's first node reported them)."""
    reported = len(out.prompt_logprobs)
    whole = out.prompt_logprobs_first + reported == len(prompt) - 1
    return whole and reported == len(out.prompt_top_logprobs)


def echo_entries(prompt: Sequence[int], out: TokenOutput, top: int) -> Entries:
    """The prompt's tokens, `top` best each, to lead a completion's logprobs."""
    tops: list[Sequence[Sequence[float]] | None] = [row[:top] for row in out.prompt_top_logprobs]
    return Entries(list(prompt), [None, *out.prompt_logprobs], [None, *tops])


def vllm_prompt_logprobs(
    prompt: Sequence[int], out: TokenOutput, top: int, text_of: TokenText
) -> PromptLogprobs:
    entries: PromptLogprobs = [None]
    rows = zip(prompt[1:], out.prompt_logprobs, out.prompt_ranks, out.prompt_top_logprobs)
    for token, logprob, rank, best in rows:
        entry = {str(token): _vllm_logprob(logprob, rank, text_of(token))}
        for place, (t, v) in enumerate(best[:top], start=1):
            entry.setdefault(str(int(t)), _vllm_logprob(v, place, text_of(int(t))))
        entries.append(entry)
    return entries


def _vllm_logprob(logprob: float, rank: int, text: str) -> dict[str, Any]:
    return {"logprob": max(logprob, LOWEST_LOGPROB), "rank": rank, "decoded_token": text}


def sglang_input_logprobs(
    prompt: Sequence[int], out: TokenOutput, start: int, top: int, text_of: TokenText | None
) -> dict[str, list]:
    """meta_info's input_token_logprobs (and input_top_logprobs) from position `start` on."""
    text = text_of or (lambda _token: None)
    skipped = [None] * (1 + out.prompt_logprobs_first)  # NOTE: start >= prompt_logprobs_first
    logprobs = [*skipped, *out.prompt_logprobs]
    tokens = [
        [None if i == start else logprobs[i], prompt[i], text(prompt[i])]
        for i in range(start, len(prompt))
    ]
    meta: dict[str, list] = {"input_token_logprobs": tokens}
    if top > 0:
        best = [*skipped, *out.prompt_top_logprobs]
        meta["input_top_logprobs"] = [
            None if i == start else [[v, int(t), text(int(t))] for t, v in best[i][:top]]
            for i in range(start, len(prompt))
        ]
    return meta
