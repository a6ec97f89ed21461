"""A node's SSE streams: each job's outputs as chunks, an error event on failure, then [DONE]."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from api.errors import ApiError
from api.openai_responses import Usage
from api.resume import ids_comment
from api.sse import DONE, encode_event, error_event
from node.jobs import JobRun, JobState
from node.messages import TokenOutput
from node.responses import usage_of

ChunkMaker = Callable[[JobState, TokenOutput], dict[str, Any] | None]


async def stream_jobs(
    run: JobRun,
    first: list[tuple[JobState, TokenOutput]],
    chunk: ChunkMaker,
    tail: Callable[[], list[dict[str, Any]]],
    tag: bool = False,
) -> AsyncIterator[bytes]:
    """The events of a run whose first outputs arrived already; aborts what is left at the end
    (the client went away, or a job failed). With `tag`, each event carries the token ids it
    added in a comment line first (api/resume.py)."""
    untold: list[int] = []  # ids of outputs that made no event, told with the next one

    def event(payload: dict[str, Any] | None, out: TokenOutput | None) -> bytes:
        if out is not None:
            untold.extend(out.token_ids)
        if payload is None:
            return b""
        if not tag:
            return encode_event(payload)
        line = ids_comment(untold, out is not None and out.finished)
        untold.clear()
        return line + encode_event(payload)

    try:
        for state, out in first:
            if data := event(chunk(state, out), out):
                yield data
        while not run.done:
            state, out = await run.next()
            if data := event(chunk(state, out), out):
                yield data
        for payload in tail():
            yield event(payload, None)
    except ApiError as err:
        yield error_event(err)
    finally:
        await run.close()
    yield DONE


def usage_tail(
    include: bool, run: JobRun, response: Any, rid: str, created: int, model: str
) -> Callable[[], list[dict[str, Any]]]:
    """The stream's last chunk: usage with no choices, when stream_options.include_usage."""

    def tail() -> list[dict[str, Any]]:
        if not include:
            return []
        usage = usage_of(run.ordered)
        chunk = response(id=rid, created=created, model=model, choices=[], usage=usage)
        return [chunk.model_dump(exclude_none=True)]

    return tail


def usage_so_far(include: bool, state: JobState) -> Usage | None:
    """A chunk's own usage with vLLM's continuous_usage_stats: its choice's so far (as vLLM
    counts it), else None."""
    return usage_of([state]) if include else None


def chunk_payload(response: Any, finish_reason: str | None) -> dict[str, Any]:
    """A stream chunk as OpenAI writes it: `finish_reason` null until the last one (and vLLM's
    `stop_reason` null but on the last one)."""
    payload = response.model_dump(exclude_none=True)
    for choice in payload["choices"]:
        choice["finish_reason"] = finish_reason
        choice.setdefault("stop_reason", None)
    return payload
