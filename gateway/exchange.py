"""One attempt of one request on one (prefill, decode) pair: SGLang's PD protocol.

The same JSON body goes to both nodes (`pd.Attempt`). The decode node's answer is the client's
answer; the prefill node's is awaited alongside it (`PrefillSide`). What each answer means is
decided by `outcome`: until something reaches the client, a failure of either side raises
`AttemptFailed` (the caller retries on another pair) and a refusal raises `Refused` (no retry).
After that, `relay` turns a failure into an SSE error event. An attempt that ends any other way
(client gone, cancelled) aborts both nodes.

An `Exchange` is handed what it uses (the upstream client, a task spawner, a clock); it never
sees the `Gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import httpx

from api.sse import DONE, error_event, error_in

from . import outcome
from .background import Background
from .events import NO_EVENTS, Events, EventSplitter
from .logs import log_event
from .outcome import AttemptFailed, Finished, Refused
from .pd import Attempt
from .prefill_side import PrefillSide
from .tracker import Tracker
from .upstream import Upstream
from .workers import Worker

DRAIN_TIMEOUT_S = 5.0  # what a node may still send after [DONE] before its connection is dropped


class StreamCut(Exception):
    """The decode stream ended without `[DONE]`."""


class Exchange:
    def __init__(
        self,
        attempt: Attempt,
        upstream: Upstream,
        tasks: Background,
        clock: Callable[[], float],
    ) -> None:
        self.attempt, self.pair = attempt, attempt.pair
        self.upstream, self.tasks, self.clock = upstream, tasks, clock
        self.headers = upstream.headers(attempt.rid, len(attempt.content))
        self.splitter = EventSplitter()
        self.prefill = PrefillSide.none()
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._decode_open = False
        self._closed = False

    # ---- opening: nothing has reached the client yet ----

    async def open(self) -> Finished | Events:
        """The whole answer (non-stream), or the first events of a stream; raises the verdict
        (`Refused`, `AttemptFailed`) of a side that refused or failed."""
        tokens = self.attempt.req.key.tokens
        self._decode_open = True
        self.pair.decode.begin(tokens, self.clock())
        if self.pair.prefill is not None:
            self.prefill = PrefillSide.start(
                self.pair.prefill,
                self._post(self.pair.prefill),
                tokens,
                self.upstream,
                self.tasks,
                self.clock,
                self.attempt.rid,
            )
        try:
            return await self._open_decode()
        except AttemptFailed as exc:
            error, node_rid = exc.error.message, self.attempt.node_rid
            log_event(
                logging.WARNING, "attempt_failed", self.attempt.rid, attempt=node_rid, error=error
            )
            self.abandon()
            raise
        except Refused:
            self.pair.decode.breaker.record_success()
            self.abandon()
            raise
        except BaseException:
            self.abandon()
            raise

    async def _open_decode(self) -> Finished | Events:
        decode, guard = self.pair.decode, self.prefill.guard
        verdict: Finished | Events | Refused | AttemptFailed
        try:
            response = self._response = await guard(self.upstream.send(self._post(decode)))
            if response.status_code >= 400 or not self.attempt.req.stream:
                body = await guard(response.aread())
                media_type = response.headers.get("content-type", "application/json")
                verdict = outcome.decode_answer(decode.url, response.status_code, body, media_type)
            else:
                self._chunks = response.aiter_bytes()
                verdict = outcome.first_events(decode.url, await guard(self._first_events()))
        except httpx.HTTPError as exc:
            verdict = outcome.unreachable("decode", decode.url, exc)
        if isinstance(verdict, AttemptFailed):
            decode.attempt_failed(self.clock(), verdict.draining)
            raise verdict
        if isinstance(verdict, Refused):
            raise verdict
        if isinstance(verdict, Finished):
            await self._finish_decode()
        return verdict

    def _post(self, worker: Worker) -> httpx.Request:
        attempt = self.attempt
        return self.upstream.post(worker.url, attempt.req.route, attempt.content, self.headers)

    async def _first_events(self) -> Events:
        assert self._chunks is not None
        async for chunk in self._chunks:
            events = self.splitter.feed(chunk)
            if events.any:
                return events
        return NO_EVENTS

    # ---- relaying a stream: events have reached the client ----

    async def relay(self, first: Events, tracker: Tracker) -> AsyncIterator[bytes]:
        """The client's SSE stream; ends in `[DONE]`, with an error event before it on failure.

        The events that arrive together leave together (one write to the client per chunk the
        node sent, `[DONE]` joined to the last), as `EventSplitter` relays them.
        """
        ended_in_error = False
        try:
            events = first
            while True:
                if events.data:
                    tracker.first_event()
                    assert events.last is not None
                    ended_in_error = error_in(events.last) is not None
                if events.done:
                    await self._finish_decode()
                    yield events.data + DONE
                    return
                if events.data:
                    yield events.data
                events = self.splitter.feed(await self._next_chunk())
        except (httpx.HTTPError, StreamCut) as exc:
            self._close_decode(ok=False)
            tracker.stream_failed()
            log_event(logging.WARNING, "stream_failed", self.attempt.rid, error=repr(exc))
            if not ended_in_error:
                yield error_event(outcome.cut_mid_stream(self.pair.decode.url, exc))
            yield DONE
        finally:
            self.abandon()  # a no-op once closed; else the client went away mid-stream

    async def _next_chunk(self) -> bytes:
        assert self._chunks is not None
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            raise StreamCut("the decode stream ended without [DONE]") from None

    # ---- closing ----

    async def _finish_decode(self) -> None:
        """The decode answer is complete: release its load, hand its connection back."""
        response = self._response
        at_end = response is not None and (self._chunks is None or _at_end(response))
        self._close_decode(ok=True, release=not at_end)
        if at_end:
            await response.aclose()  # NOTE: nothing left to drain: this never waits

    def _close_decode(self, ok: bool, release: bool = True) -> None:
        """The decode answer is complete (ok) or broken; release its load and connection."""
        self._closed = True
        self._end_decode_load()
        if ok:
            self.pair.decode.breaker.record_success()
        else:
            self.pair.decode.breaker.record_failure(self.clock())
        if release and self._response is not None:
            self.tasks.spawn(self._release_response(drain=ok))

    async def _release_response(self, drain: bool) -> None:
        """Close the decode response; drained first, its connection goes back to the pool."""
        assert self._response is not None
        if drain and self._chunks is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_drain(self._chunks), DRAIN_TIMEOUT_S)
        await self._response.aclose()

    def abandon(self) -> None:
        """Stop the attempt where it stands and abort the request on both nodes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._end_decode_load()
        self.prefill.cancel()
        self.tasks.spawn(self._abort_both())

    def _end_decode_load(self) -> None:
        if self._decode_open:
            self._decode_open = False
            self.pair.decode.end(self.attempt.req.key.tokens)

    async def _abort_both(self) -> None:
        if self._response is not None:
            await self._response.aclose()
        targets = [w for w in (self.pair.prefill, self.pair.decode) if w is not None]
        rid, node_rid = self.attempt.rid, self.attempt.node_rid
        log_event(logging.INFO, "abort", rid, attempt=node_rid)
        await asyncio.gather(*(self.upstream.abort(w.url, node_rid) for w in targets))


def _at_end(response: httpx.Response) -> bool:
    """Has the body's last byte arrived (so closing it keeps its connection)? `NodeTransport`'s
    bodies know; for any other, assume not (the caller then drains it in the background)."""
    return bool(getattr(response.stream, "at_end", False))


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass
