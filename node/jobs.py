"""One HTTP request's jobs in flight: submit them, add up their outputs, abort what is left.

A run tracks itself with the node's drain (node/drain.py), which may cut it: its next output is
then the drain's error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from api.errors import ApiError, invalid_request, server_error
from node.channel import SchedulerClient
from node.drain import Drain
from node.messages import TokenOutput
from node.requests import Job

log = logging.getLogger(__name__)
WAKE = TokenOutput("")  # put on a cut run's queue so that a waiting `next()` returns


@dataclass
class JobState:
    """A job and its output so far (the deltas added up)."""

    job: Job
    out: TokenOutput
    first_token_s: float | None = None  # from the run's start


class JobRun:
    def __init__(
        self,
        client: SchedulerClient,
        jobs: Sequence[Job],
        timeout_s: float,
        drain: Drain | None = None,
    ) -> None:
        self.client = client
        self.drain = drain
        self.cut_by: ApiError | None = None
        self.queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self.states = {job.request.rid: JobState(job, TokenOutput(job.request.rid)) for job in jobs}
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.first_token_s: float | None = None
        self._opened: list[str] = []

    @property
    def ordered(self) -> list[JobState]:
        return sorted(self.states.values(), key=lambda s: s.job.index)

    def first_of(self, prompt_index: int) -> JobState:
        """The prompt's first sample's job: the one that computes the prompt's logprobs."""
        states = [s for s in self.states.values() if s.job.prompt_index == prompt_index]
        return min(states, key=lambda s: s.job.index)

    @property
    def done(self) -> bool:
        return all(s.out.finished for s in self.states.values())

    async def start(self) -> None:
        if self.drain is not None:
            self.drain.track(self)
        for rid in self.states:
            self.client.open(rid, self.queue)
            self._opened.append(rid)
        for state in self.states.values():
            try:
                await self.client.send(state.job.request)
            except OverflowError:  # msgpack: an integer beyond 64 bits
                raise invalid_request(
                    "a number in the request is out of range (integers such as max_tokens, seed "
                    "and top_k must fit in 64 bits)"
                ) from None

    async def next(self) -> tuple[JobState, TokenOutput]:
        """The next output of any job; raises ApiError for a job's error, the timeout or a cut."""
        if self.cut_by is not None:
            raise self.cut_by
        remaining = self.deadline - time.monotonic()
        try:
            # NOTE: asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that
            # meets an item arriving (the request would go on after its client left)
            async with asyncio.timeout(max(remaining, 0.001)):
                out = await self.queue.get()
        except TimeoutError:
            raise server_error(
                f"request timed out after {self.timeout_s:.0f}s", status=504, code="timeout"
            ) from None
        if self.cut_by is not None:
            raise self.cut_by
        state = self.states[out.rid]
        if out.error is not None:
            state.out.finished = True
            raise ApiError(out.status, out.error)
        if out.token_ids and state.first_token_s is None:
            state.first_token_s = time.monotonic() - self.started
            if self.first_token_s is None:
                self.first_token_s = state.first_token_s
        state.out.add(out)
        if out.finished:
            self._log_finished(state)
        return state, out

    def _log_finished(self, state: JobState) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        out, ttft = state.out, state.first_token_s
        log.debug(
            "[%s] finished: prompt_tokens=%d cached_tokens=%d output_tokens=%d finish_reason=%s "
            "ttft_s=%s e2e_s=%.3f",
            out.rid,
            out.prompt_tokens,
            out.cached_tokens,
            out.completion_tokens,
            out.finish_reason,
            "-" if ttft is None else f"{ttft:.3f}",
            time.monotonic() - self.started,
        )

    async def first_outputs(self) -> list[tuple[JobState, TokenOutput]]:
        """Wait until every job answered once (so a bad request fails before any byte is sent)."""
        waiting = set(self.states)
        got = []
        while waiting:
            state, out = await self.next()
            waiting.discard(state.job.request.rid)
            got.append((state, out))
        return got

    async def rest(self) -> list[tuple[JobState, TokenOutput]]:
        got = []
        while not self.done:
            got.append(await self.next())
        return got

    def cut(self, error: ApiError) -> None:
        """End the run with `error` at once (the node drains and its time ran out); `close()`
        then aborts what is left."""
        self.cut_by = error
        self.queue.put_nowait(WAKE)

    async def close(self) -> None:
        """Abort unfinished jobs on the scheduler and stop routing their outputs."""
        if self.drain is not None:
            self.drain.untrack(self)
        for rid in self._opened:
            if not self.states[rid].out.finished:
                await self.client.abort(rid)
            self.client.close(rid)
        self._opened = []
