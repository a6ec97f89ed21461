"""Node responses: each job's gathered outputs, and the OpenAI / SGLang shapes built from them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from api.messages import TokenOutput
from api.node_requests import Job
from api.openai import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)

TokenText = Callable[[int], str]


@dataclass
class JobState:
    job: Job
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finished: bool = False

    def apply(self, out: TokenOutput) -> None:
        self.text += out.text_delta
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        self.top_logprobs.extend(out.top_logprobs)
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens or self.completion_tokens
        self.cached_tokens = out.cached_tokens or self.cached_tokens
        if out.finished:
            self.finished = True
            self.finish_reason, self.matched_stop = out.finish_reason, out.matched_stop


def usage_of(states: Sequence[JobState]) -> Usage:
    """Prompt tokens count once per prompt (not per sample), as OpenAI counts them."""
    firsts = {s.job.prompt_index: s for s in states}
    prompt = sum(s.prompt_tokens for s in firsts.values())
    cached = sum(s.cached_tokens for s in firsts.values())
    completion = sum(s.completion_tokens for s in states)
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


def native_result(state: JobState, rid: str, latency_s: float, with_logprobs: bool) -> dict:
    reason: dict[str, Any] | None = None
    if state.finish_reason == "length":
        reason = {"type": "length", "length": state.completion_tokens}
    elif state.finish_reason is not None:
        reason = {"type": state.finish_reason, "matched": state.matched_stop}
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": reason,
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens": state.completion_tokens,
        "cached_tokens": state.cached_tokens,
        "e2e_latency": round(latency_s, 6),
    }
    if with_logprobs:
        meta["output_token_logprobs"] = [
            [lp, tid, None] for lp, tid in zip(state.logprobs, state.token_ids)
        ]
        meta["output_top_logprobs"] = [
            [[v, int(t), None] for t, v in row] for row in state.top_logprobs
        ]
    return {"text": state.text, "output_ids": list(state.token_ids), "meta_info": meta}
