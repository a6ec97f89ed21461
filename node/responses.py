"""Node responses: the OpenAI / SGLang shapes written from each job's added-up `TokenOutput`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from api.openai import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from node.jobs import JobState
from node.messages import TokenOutput

TokenText = Callable[[int], str]


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


def completion_logprobs(
    ids: Sequence[int],
    lps: Sequence[float],
    tops: Sequence[Sequence],
    text_of: TokenText,
    start: int,
) -> CompletionLogprobs:
    tokens = [text_of(t) for t in ids]
    offsets, pos = [], start
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=list(lps),
        top_logprobs=[{text_of(int(t)): lp for t, lp in row} for row in tops] if tops else [],
        text_offset=offsets,
    )


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


def native_result(out: TokenOutput, latency_s: float, with_logprobs: bool) -> dict:
    """SGLang's /generate result of one job (its added-up output)."""
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
    if with_logprobs:
        meta["output_token_logprobs"] = [
            [lp, tid, None] for lp, tid in zip(out.logprobs, out.token_ids)
        ]
        meta["output_top_logprobs"] = [
            [[v, int(t), None] for t, v in row] for row in out.top_logprobs
        ]
    return {"text": out.text, "output_ids": list(out.token_ids), "meta_info": meta}
