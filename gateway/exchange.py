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
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import httpx

from api.errors import ApiError, server_error
from api.sse import DONE, DONE_PAYLOAD, SSEDecoder, encode_event, error_event, error_in

from .context import Gateway, Pair
from .logs import log_event
from .pd import (
    AttemptFailed,
    Finished,
    Refused,
    is_client_error,
    pd_body,
    prefill_outcome,
    status_of,
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
        self.headers = {"content-type": "application/json", "x-request-id": rid}
        self.decoder = SSEDecoder()
        self._prefill: asyncio.Task[Finished | ApiError | None] | None = None
        self._prefill_ok = False
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._decode_open = False
        self._closed = False

    # ---- opening: nothing has reached the client yet ----

    async def open(self) -> Finished | list[bytes]:
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

    async def _open_decode(self) -> Finished | list[bytes]:
        decode = self.pair.decode
        request = self.gw.client.build_request(
            "POST", decode.url + self.req.route, content=self.content, headers=self.headers
        )
        try:
            self._response = await self._unless_prefill_fails(
                self.gw.client.send(request, stream=True)
            )
            if self._response.status_code >= 400:
                raise await self._rejection()
            if not self.req.stream:
                body = await self._unless_prefill_fails(self._response.aread())
                self._close_decode(ok=True)
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

    async def _first_events(self) -> list[bytes]:
        assert self._chunks is not None
        async for chunk in self._chunks:
            events = self.decoder.feed(chunk)
            if events:
                return events
        return []

    def _check_first(self, first: list[bytes]) -> list[bytes]:
        if not first:
            raise self._decode_failed("its stream ended before the first event")
        error = error_in(first[0])
        if error is None:
            return first
        if is_client_error(error):
            raise Refused(Finished(status_of(error), json.dumps({"error": error}).encode()))
        raise self._decode_failed(f"its stream began with an error: {error.get('message')}")

    def _decode_failed(self, what: str) -> AttemptFailed:
        decode = self.pair.decode
        decode.breaker.record_failure(self.gw.clock())
        message = f"decode instance {decode.url} failed: {what}"
        return AttemptFailed(decode, server_error(message, 502, code="upstream_error"))

    async def _unless_prefill_fails(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, unless the prefill side fails first (then it is cancelled)."""
        if self._prefill is None or self._prefill_ok:
            return await awaitable
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({task, self._prefill}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task.done():
            return task.result()
        outcome = self._prefill.result()
        if outcome is None:
            self._prefill_ok = True
            return await task
        task.cancel()
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
        try:
            response = await self.gw.client.post(
                prefill.url + self.req.route, content=self.content, headers=self.headers
            )
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

    async def relay(self, first: list[bytes], tracker: Tracker) -> AsyncIterator[bytes]:
        """The client's SSE stream; ends in `[DONE]`, with an error event before it on failure."""
        ended_in_error = False
        try:
            async with contextlib.aclosing(self._payloads(first)) as payloads:
                async for payload in payloads:
                    tracker.first_event()
                    ended_in_error = error_in(payload) is not None
                    yield encode_event(payload)
            self._close_decode(ok=True)
            yield DONE
        except (httpx.HTTPError, StreamCut) as exc:
            self._close_decode(ok=False)
            self.gw.metrics.stream_errors += 1
            log_event(logging.WARNING, "stream_failed", self.rid, error=repr(exc))
            if not ended_in_error:
                yield error_event(self._cut_error(exc))
            yield DONE
        finally:
            self.abandon()  # a no-op once closed; else the client went away mid-stream

    async def _payloads(self, first: list[bytes]) -> AsyncIterator[bytes]:
        for payload in first:
            if payload == DONE_PAYLOAD:
                return
            yield payload
        assert self._chunks is not None
        async for chunk in self._chunks:
            for payload in self.decoder.feed(chunk):
                if payload == DONE_PAYLOAD:
                    return
                yield payload
        raise StreamCut("the decode stream ended without [DONE]")

    def _cut_error(self, exc: Exception) -> ApiError:
        return server_error(
            f"decode instance {self.pair.decode.url} failed mid-stream ({exc}); "
            "the response is incomplete",
            502,
            code="upstream_error",
        )

    # ---- closing ----

    def _close_decode(self, ok: bool) -> None:
        """The decode answer is complete (ok) or broken; release its load and connection."""
        self._closed = True
        self._end_decode_load()
        if ok:
            self.pair.decode.breaker.record_success()
        else:
            self.pair.decode.breaker.record_failure(self.gw.clock())
        if self._response is not None:
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


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass
