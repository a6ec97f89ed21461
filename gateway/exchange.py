"""One attempt of one request on one (prefill, decode) pair: SGLang's PD protocol.

The same JSON body goes to both nodes, with `rid` and (PD mode) `bootstrap_host`,
`bootstrap_port`, `bootstrap_room` added. The decode node's answer is the client's answer; the
prefill node's is awaited alongside it. Until something reaches the client, a failure of either
side raises `AttemptFailed` (the caller retries on another pair) and a 4xx of either side raises
`Refused` (the request itself is wrong: no retry). After that, `relay` turns a failure into an SSE
error event. An attempt that ends any other way (client gone, cancelled) aborts both nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import httpx

from api.errors import ApiError, server_error
from api.sse import DONE, error_event, error_in

from .context import Gateway, Pair
from .events import NO_EVENTS, Events, EventSplitter
from .logs import log_event
from .pd import (
    AttemptFailed,
    Finished,
    Refused,
    is_client_error,
    pd_body,
    prefill_outcome,
)
from .requests import Prepared
from .tracker import Tracker
from .workers import Worker

T = TypeVar("T")
DRAIN_TIMEOUT_S = 5.0  # what a node may still send after [DONE] before its connection is dropped


class StreamCut(Exception):
    """The decode stream ended without `[DONE]`."""


class Exchange:
    def __init__(self, gw: Gateway, req: Prepared, rid: str, attempt_rid: str, pair: Pair) -> None:
        self.gw, self.req, self.pair = gw, req, pair
        self.rid, self.attempt_rid = rid, attempt_rid
        self.content = json.dumps(pd_body(req, attempt_rid, pair, gw.rng)).encode()
        self.headers = gw.node_headers(rid, len(self.content))
        self.splitter = EventSplitter()
        self._prefill: asyncio.Task[Finished | ApiError | None] | None = None
        self._prefill_ok = False
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._decode_open = False
        self._closed = False

    # ---- opening: nothing has reached the client yet ----

    async def open(self) -> Finished | Events:
        """The whole answer (non-stream, or a node's 4xx), or the first events of a stream."""
        self._decode_open = True
        self.pair.decode.begin(self.req.key.tokens, self.gw.clock())
        if self.pair.prefill is not None:
            self._prefill = self._start_prefill(self.pair.prefill)
        try:
            return await self._open_decode()
        except AttemptFailed as exc:
            self._log_failure(exc)
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
        request = self.gw.node_request(
            self.pair.decode.url, self.req.route, self.content, self.headers
        )
        try:
            self._response = await self._unless_prefill_fails(self.gw.send(request))
            if self._response.status_code >= 400:
                raise await self._rejection()
            if not self.req.stream:
                body = await self._unless_prefill_fails(self._response.aread())
                await self._finish_decode()
                media = self._response.headers.get("content-type", "application/json")
                return Finished(self._response.status_code, body, media)
            self._chunks = self._response.aiter_bytes()
            first = await self._unless_prefill_fails(self._first_events())
        except httpx.HTTPError as exc:
            raise self._decode_failed(f"{type(exc).__name__}: {exc}") from None
        return self._check_first(first)

    async def _rejection(self) -> Exception:
        assert self._response is not None
        body = await self._unless_prefill_fails(self._response.aread())
        status = self._response.status_code
        if status < 500:
            return Refused(Finished(status, body))
        return self._decode_failed(f"HTTP {status}: {body[:300].decode(errors='replace')}")

    async def _first_events(self) -> Events:
        assert self._chunks is not None
        async for chunk in self._chunks:
            events = self.splitter.feed(chunk)
            if events.any:
                return events
        return NO_EVENTS

    def _check_first(self, first: Events) -> Events:
        if not first.any:
            raise self._decode_failed("its stream ended before the first event")
        error = error_in(first.first) if first.first is not None else None
        if error is None:
            return first
        if is_client_error(error):
            raise Refused(Finished(400, json.dumps({"error": error}).encode()))
        raise self._decode_failed(f"its stream began with an error: {error.get('message')}")

    def _decode_failed(self, what: str) -> AttemptFailed:
        decode = self.pair.decode
        decode.breaker.record_failure(self.gw.clock())
        message = f"decode instance {decode.url} failed: {what}"
        return AttemptFailed(decode, server_error(message, 502, code="upstream_error"))

    async def _unless_prefill_fails(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, unless the prefill side fails first (then it is cancelled)."""
        prefill = self._prefill
        if prefill is None or self._prefill_ok:
            return await awaitable
        if prefill.done():
            try:
                self._check_prefill(prefill)
            except BaseException:
                if inspect.iscoroutine(awaitable):
                    awaitable.close()  # never awaited: close it rather than leak a warning
                raise
            return await awaitable
        task = asyncio.ensure_future(awaitable)
        failed = False

        def on_prefill(done: asyncio.Future[Finished | ApiError | None]) -> None:
            nonlocal failed
            if task.done():
                return
            if done.cancelled() or done.exception() is not None or done.result() is not None:
                failed = True
                task.cancel()

        prefill.add_done_callback(on_prefill)
        try:
            return await task
        except asyncio.CancelledError:
            if not failed:
                raise
        finally:
            prefill.remove_done_callback(on_prefill)
        self._check_prefill(prefill)
        raise AssertionError("unreachable: the prefill side failed")

    def _check_prefill(self, prefill: asyncio.Future[Finished | ApiError | None]) -> None:
        """Raise what the finished prefill side's failure means (`Refused`, `AttemptFailed`)."""
        outcome = prefill.result()
        if outcome is None:
            self._prefill_ok = True
            return
        if isinstance(outcome, Finished):
            raise Refused(outcome)
        assert self.pair.prefill is not None
        raise AttemptFailed(self.pair.prefill, outcome)

    # ---- the prefill side ----

    def _start_prefill(self, prefill: Worker) -> asyncio.Task[Finished | ApiError | None]:
        tokens = self.req.key.tokens
        prefill.begin(tokens, self.gw.clock())
        task = self.gw.spawn(self._run_prefill(prefill))
        # NOTE: a callback, not a finally: a task cancelled before it ran never enters its body
        task.add_done_callback(lambda _: prefill.end(tokens))
        return task

    async def _run_prefill(self, prefill: Worker) -> Finished | ApiError | None:
        """None when prefill succeeded; its 4xx answer; or the error that failed it."""
        request = self.gw.node_request(prefill.url, self.req.route, self.content, self.headers)
        try:
            response = await self.gw.send(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
            outcome = prefill_outcome(prefill, response)
        except httpx.HTTPError as exc:
            what = f"{type(exc).__name__}: {exc}"
            outcome = server_error(f"prefill instance {prefill.url} failed: {what}", 502)
        if isinstance(outcome, ApiError):
            prefill.breaker.record_failure(self.gw.clock())
            log_event(logging.WARNING, "prefill_failed", self.rid, error=outcome.message)
        else:
            prefill.breaker.record_success()
        return outcome

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
            self.gw.metrics.stream_errors += 1
            log_event(logging.WARNING, "stream_failed", self.rid, error=repr(exc))
            if not ended_in_error:
                yield error_event(self._cut_error(exc))
            yield DONE
        finally:
            self.abandon()  # a no-op once closed; else the client went away mid-stream

    async def _next_chunk(self) -> bytes:
        assert self._chunks is not None
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            raise StreamCut("the decode stream ended without [DONE]") from None

    def _cut_error(self, exc: Exception) -> ApiError:
        return server_error(
            f"decode instance {self.pair.decode.url} failed mid-stream ({exc}); "
            "the response is incomplete",
            502,
            code="upstream_error",
        )

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
            self.pair.decode.breaker.record_failure(self.gw.clock())
        if release and self._response is not None:
            self.gw.spawn(self._release_response(drain=ok))

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
        if self._prefill is not None and not self._prefill.done():
            self._prefill.cancel()
        self.gw.spawn(self._abort_both())

    def _end_decode_load(self) -> None:
        if self._decode_open:
            self._decode_open = False
            self.pair.decode.end(self.req.key.tokens)

    async def _abort_both(self) -> None:
        if self._response is not None:
            await self._response.aclose()
        targets = [w for w in (self.pair.prefill, self.pair.decode) if w is not None]
        log_event(logging.INFO, "abort", self.rid, attempt=self.attempt_rid)
        await asyncio.gather(*(self.gw.abort(w, self.attempt_rid) for w in targets))

    def _log_failure(self, exc: AttemptFailed) -> None:
        error = exc.error.message
        log_event(
            logging.WARNING, "attempt_failed", self.rid, attempt=self.attempt_rid, error=error
        )


def _at_end(response: httpx.Response) -> bool:
    """Has the body's last byte arrived (so closing it keeps its connection)? `NodeTransport`'s
    bodies know; for any other, assume not (the caller then drains it in the background)."""
    return bool(getattr(response.stream, "at_end", False))


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass
