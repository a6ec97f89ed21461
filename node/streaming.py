"""A node's SSE streams: each job's outputs as chunks, an error event on failure, then [DONE]."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from api.errors import ApiError
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
) -> AsyncIterator[bytes]:
    """The events of a run whose first outputs arrived already; aborts what is left at the end
    (the client went away, or a job failed)."""
    try:
        for state, out in first:
            payload = chunk(state, out)
            if payload is not None:
                yield encode_event(payload)
        while not run.done:
            state, out = await run.next()
            payload = chunk(state, out)
            if payload is not None:
                yield encode_event(payload)
        for payload in tail():
            yield encode_event(payload)
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


def chunk_payload(response: Any, finish_reason: str | None) -> dict[str, Any]:
    """A stream chunk as OpenAI writes it: `finish_reason` null until the last one."""
    payload = response.model_dump(exclude_none=True)
    for choice in payload["choices"]:
        choice["finish_reason"] = finish_reason
    return payload
