"""One attempt of one request on one (prefill, decode) pair: SGLang's PD protocol.

The same JSON body goes to both nodes (`pd.Attempt`). The decode node's answer is the client's
answer; the prefill node's is awaited alongside it (`PrefillSide`). What each answer means is
decided by `outcome`: until something reaches the client, a failure of either side raises
`AttemptFailed` (the caller retries on another pair) and a refusal raises `Refused` (no retry).
After that, `relay` raises `StreamBroken` on a failure of the decode side, once every good event
before it was relayed (gateway/migration.py moves the stream on, or ends it in an error event).
An attempt that ends any other way (client gone, cancelled) aborts both nodes.

Failures are noticed in seconds: the first event may take `first_token_timeout_s` and the next
ones `token_timeout_s` each (read timeouts), and an instance the health checks take out of routing
fails what this exchange awaits from it at once (`Worker.watchers`).

An `Exchange` is handed what it uses (the upstream client, a task spawner, a clock); it never
sees the `Gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import httpx

from api.errors import DRAINING, ApiError
from api.settings import GatewaySettings
from api.sse import DONE, error_in

from . import outcome
from .background import Background
from .events import NO_EVENTS, Events, EventSplitter, token_ids
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


class StreamBroken(Exception):
    """The decode side failed after events reached the client; `error` says how."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class Exchange:
    def __init__(
        self,
        attempt: Attempt,
        upstream: Upstream,
        tasks: Background,
        clock: Callable[[], float],
        settings: GatewaySettings,
    ) -> None:
        self.attempt, self.pair = attempt, attempt.pair
        self.upstream, self.tasks, self.clock = upstream, tasks, clock
        self.settings = settings
        self.headers = upstream.headers(attempt.rid, len(attempt.content))
        self.splitter = EventSplitter()
        self.prefill = PrefillSide.none()
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._decode_open = False
        self._closed = False
        # what the client was sent, as token ids (api/resume.py): for moving the stream on
        self._ids: list[bytes] = []  # the events' ids as they came (`streamed` parses them)
        self.last_payload: bytes | None = None  # the last event the client got from here
        self.untagged = 0  # events sent without ids: the stream cannot be moved
        self.finished = False  # the node said the request finished
        self.ended_in_error = False  # a refusal's error event was relayed
        self._opening: asyncio.Timeout | None = None  # set while opening: expired when gone
        self._gone: AttemptFailed | None = None  # an instance was taken out under us
        self._watching: list[Worker] = []

    # ---- opening: nothing has reached the client yet ----

    async def open(self) -> Finished | Events:
        """The whole answer (non-stream), or the first events of a stream; raises the verdict
        (`Refused`, `AttemptFailed`) of a side that refused or failed."""
        tokens = self.attempt.req.key.tokens
        self._decode_open = True
        self.pair.decode.begin(tokens, self.clock())
        self._watch(self.pair.decode)
        if self.pair.prefill is not None:
            self._watch(self.pair.prefill)
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
            return await self._open_watched()
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

    async def _open_watched(self) -> Finished | Events:
        """`_open_decode`, failed at once when an instance of the pair is taken out (`taken_out`
        expires the timeout: a cancellation of this task that asyncio.timeout takes back)."""
        try:
            async with asyncio.timeout(None) as self._opening:
                return await self._open_decode()
        except TimeoutError:
            if self._gone is None:
                raise
            raise self._gone from None
        finally:
            self._opening = None

    async def _open_decode(self) -> Finished | Events:
        decode, guard = self.pair.decode, self.prefill.guard
        stream = self.attempt.req.stream
        verdict: Finished | Events | Refused | AttemptFailed
        try:
            first_s = self.settings.first_token_timeout_s if stream else None
            request = self._post(decode, first_s)
            response = self._response = await guard(self.upstream.send(request))
            if response.status_code >= 400 or not stream:
                body = await guard(response.aread())
                media_type = response.headers.get("content-type", "application/json")
                verdict = outcome.decode_answer(decode.url, response.status_code, body, media_type)
            else:
                self._chunks = response.aiter_bytes()
                verdict = outcome.first_events(decode.url, await guard(self._first_events()))
                if hasattr(response.stream, "read_timeout"):  # NodeTransport's: from now on
                    response.stream.read_timeout = self.settings.token_timeout_s
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

    def _post(self, worker: Worker, read_timeout_s: float | None = None) -> httpx.Request:
        attempt = self.attempt
        return self.upstream.post(
            worker.url, attempt.req.route, attempt.content, self.headers, read_timeout_s
        )

    def _watch(self, worker: Worker) -> None:
        worker.watchers.add(self)
        self._watching.append(worker)

    def _unwatch(self) -> None:
        for worker in self._watching:
            worker.watchers.discard(self)
        self._watching = []

    def taken_out(self, worker: Worker, reason: str) -> None:
        """`worker` left routing: fail what this exchange awaits from it (the open, or the
        decode stream; a prefill node that already answered no longer matters)."""
        if self._closed or self._gone is not None or reason == DRAINING:
            return  # NOTE: a draining node finishes what it holds, or says when it cannot
        if self._opening is None and worker is not self.pair.decode:
            return
        role = "decode" if worker is self.pair.decode else "prefill"
        self._gone = outcome.failed(role, worker.url, f"it was taken out of routing ({reason})")
        if self._opening is not None:
            self._opening.reschedule(asyncio.get_running_loop().time())
        elif self._response is not None and hasattr(self._response.stream, "fail"):
            self._response.stream.fail(httpx.ReadError(self._gone.error.message))

    async def _first_events(self) -> Events:
        assert self._chunks is not None
        async for chunk in self._chunks:
            events = self.splitter.feed(chunk)
            if events.any:
                return events
        return NO_EVENTS

    # ---- relaying a stream: events have reached the client ----

    async def relay(self, first: Events, tracker: Tracker) -> AsyncIterator[bytes]:
        """The client's events, up to and with `[DONE]`; raises `StreamBroken` when the decode
        side fails first, once the good events before the failure were yielded.

        The events that arrive together leave together (one write to the client per chunk the
        node sent, `[DONE]` joined to the last), as `EventSplitter` relays them. An error event
        of the client's kind (a refusal) is relayed; any other breaks the stream.
        """
        try:
            events = first
            while True:
                data = events.data
                if data:
                    tracker.first_event()
                    assert events.last is not None
                    error = error_in(events.last)
                    if error is not None and not outcome.is_refusal(error):
                        self._close_decode(ok=outcome.is_draining(error))
                        if good := _without_last_event(data):
                            self._count(events, _last_payload(good))
                            yield good
                        raise StreamBroken(outcome.failed_mid_stream(self.pair.decode.url, error))
                    self._count(events, events.last)
                    self.ended_in_error = error is not None
                if events.done:
                    await self._finish_decode()
                    yield data + DONE
                    return
                if data:
                    yield data
                events = self.splitter.feed(await self._next_chunk())
        except (httpx.HTTPError, StreamCut) as exc:
            # NOTE: the node may be alive (silent, or taken out while it hangs): abort there too
            self._close_decode(ok=False, release=False)
            self.tasks.spawn(self._abort_both())
            log_event(logging.WARNING, "stream_failed", self.attempt.rid, error=repr(exc))
            raise StreamBroken(outcome.cut_mid_stream(self.pair.decode.url, exc)) from None
        finally:
            self.abandon()  # a no-op once closed; else the client went away mid-stream

    @property
    def streamed(self) -> list[int]:
        """The token ids the client was sent from this exchange."""
        return token_ids(b",".join(self._ids))

    def _count(self, events: Events, last: bytes | None) -> None:
        self.last_payload = last
        if events.ids:
            self._ids.append(events.ids)
        self.untagged += events.untagged
        self.finished = self.finished or events.finished

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
        self._unwatch()
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
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await _drain(self._chunks)
        await self._response.aclose()

    def abandon(self) -> None:
        """Stop the attempt where it stands and abort the request on both nodes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
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


def _without_last_event(data: bytes) -> bytes:
    """`data` (whole events) without its last event."""
    cut = data.rfind(b"\n\ndata: ", 0, len(data) - 2)
    return data[: cut + 2] if cut >= 0 else b""


def _last_payload(data: bytes) -> bytes:
    """The payload of the last of `data`'s events (each one `data: ` line, as relayed)."""
    cut = data.rfind(b"\n\ndata: ", 0, len(data) - 2)
    return data[cut + 2 + len(b"data: ") : -2] if cut >= 0 else data[len(b"data: ") : -2]


def _at_end(response: httpx.Response) -> bool:
    """Has the body's last byte arrived (so closing it keeps its connection)? `NodeTransport`'s
    bodies know; for any other, assume not (the caller then drains it in the background)."""
    return bool(getattr(response.stream, "at_end", False))


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass
