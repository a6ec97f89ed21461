"""Node responses: the OpenAI / SGLang shapes written from each job's added-up `TokenOutput`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from api.openai_responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from api.resume import INPUT_LOGPROB_FIELDS
from node.jobs import JobState
from node.messages import TokenOutput
from node.prompt_logprobs import Entries, TokenText, has_prompt_logprobs, sglang_input_logprobs


def usage_of(states: Sequence[JobState]) -> Usage:
    """Prompt tokens count once per prompt (not per sample), as OpenAI counts them."""
    firsts = {s.job.prompt_index: s.out for s in states}
    prompt = sum(out.prompt_tokens for out in firsts.values())
    cached = sum(out.cached_tokens for out in firsts.values())
    completion = sum(s.out.completion_tokens for s in states)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def output_entries(out: TokenOutput) -> Entries:
    """The generated tokens of `out` with their logprobs and best tokens."""
    return Entries(list(out.token_ids), list(out.logprobs), list(out.top_logprobs))


def completion_logprobs(entries: Entries, text_of: TokenText, start: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: each token's text, logprob, best tokens (the token itself
    included, as OpenAI and vLLM give up to logprobs + 1 of them) and text offset from `start`."""
    tokens = [text_of(t) for t in entries.ids]
    offsets, pos = [], start
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    rows = zip(entries.ids, entries.logprobs, entries.tops)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=list(entries.logprobs),
        top_logprobs=[_best(token, lp, top or (), text_of) for token, lp, top in rows],
        text_offset=offsets,
    )


def _best(
    token: int, logprob: float | None, top: Sequence[Sequence[float]], text_of: TokenText
) -> dict[str, float] | None:
    if logprob is None:
        return None
    return {text_of(token): logprob} | {text_of(int(t)): v for t, v in top}


def chat_logprobs(
    ids: Sequence[int], lps: Sequence[float], tops: Sequence[Sequence], text_of: TokenText
) -> ChatLogprobs:
    content = []
    for i, (tid, lp) in enumerate(zip(ids, lps)):
        token = text_of(tid)
        top = tops[i] if i < len(tops) else []
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=lp,
                bytes=list(token.encode()),
                top_logprobs=[
                    TopLogprob(
                        token=text_of(int(t)), logprob=v, bytes=list(text_of(int(t)).encode())
                    )
                    for t, v in top
                ],
            )
        )
    return ChatLogprobs(content=content)


@dataclass(frozen=True)
class NativeLogprobs:
    """What /generate's return_logprob asks: `top` best tokens per position, the prompt's from
    position `start` on (None: SGLang's -1, none), token texts (return_text_in_logprobs)."""

    top: int
    start: int | None = None
    text_of: TokenText | None = None
    # a resumed stream's fields as its client got them before the move (api/resume.py)
    carried: dict[str, list] = field(default_factory=dict)


def native_result(
    out: TokenOutput,
    latency_s: float,
    logprobs: NativeLogprobs | None,
    prompt: Sequence[int] = (),
) -> dict:
    """SGLang's /generate result of one job (its added-up output; `prompt` its prompt's ids,
    and `out` carries their logprobs where asked)."""
    reason: dict[str, Any] | None = None
    if out.finish_reason == "length":
        reason = {"type": "length", "length": out.completion_tokens}
    elif out.finish_reason is not None:
        reason = {"type": out.finish_reason, "matched": out.matched_stop}
    meta: dict[str, Any] = {
        "id": out.rid,
        "finish_reason": reason,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "cached_tokens": out.cached_tokens,
        "e2e_latency": round(latency_s, 6),
    }
    if logprobs is not None:
        meta.update(native_logprobs(out, logprobs, prompt))
    return {"text": out.text, "output_ids": list(out.token_ids), "meta_info": meta}


def native_logprobs(out: TokenOutput, asked: NativeLogprobs, prompt: Sequence[int]) -> dict:
    text = asked.text_of or (lambda _token: None)
    meta: dict[str, Any] = {"input_token_logprobs": []}
    if asked.top > 0:
        meta["input_top_logprobs"] = []
    if asked.start is not None and has_prompt_logprobs(out, prompt):
        meta = sglang_input_logprobs(prompt, out, asked.start, asked.top, asked.text_of)
    carried = asked.carried
    meta.update({name: carried[name] for name in INPUT_LOGPROB_FIELDS if name in carried})
    # NOTE: a resumed stream's ids come first, without logprobs of this node (api/resume.py)
    before = len(out.token_ids) - len(out.logprobs)
    own = [[lp, tid, text(tid)] for lp, tid in zip(out.logprobs, out.token_ids[before:])]
    earlier = carried.get("output_token_logprobs") or [
        [None, tid, text(tid)] for tid in out.token_ids[:before]
    ]
    meta["output_token_logprobs"] = [*earlier, *own]
    own_top = [[[v, int(t), text(int(t))] for t, v in row] for row in out.top_logprobs]
    unknown = [None] * before if own_top or asked.top > 0 else []
    meta["output_top_logprobs"] = [*(carried.get("output_top_logprobs") or unknown), *own_top]
    return meta


def stop_reason(matched: int | str | None, params: dict[str, Any]) -> int | str | None:
    """vLLM's `stop_reason`: the stop string or stop token id that ended a choice; None for an
    EOS token (which SGLang's `matched_stop` names too) and for any other end."""
    if isinstance(matched, str) or matched in params.get("stop_token_ids", ()):
        return matched
    return None
