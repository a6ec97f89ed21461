"""A client's stream across the pairs that serve it: when the decode side fails mid-stream (the
node died, hung, was taken out of routing, or ended the stream with a server error such as a
drain), the request moves to another pair with every token id the client was sent
(api/resume.py), and the client's stream goes on: no error event, no text twice or missing, usage
counting the whole completion. Greedy output is the same as without the failure; seeded sampling
goes on from the same position.

A stream moves at most `gateway.max_migrations` times. It ends in an error event, as before
moves existed, when it cannot move: several sequences (n > 1, batches), events that came without
their ids (a foreign node), a refusal already relayed, or no pair left that answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator

from api.errors import ApiError, server_error
from api.resume import INPUT_LOGPROB_FIELDS, OUTPUT_LOGPROB_FIELDS
from api.sse import DONE, error_event

from .context import Gateway
from .dispatch import movable, open_request
from .events import Events
from .exchange import Exchange, StreamBroken
from .logs import log_event
from .outcome import Finished
from .requests import GENERATE, Prepared
from .tracker import Tracker


class StreamRelay:
    def __init__(
        self, gw: Gateway, req: Prepared, rid: str, tracker: Tracker, exchange: Exchange
    ) -> None:
        self.gw, self.req, self.rid, self.tracker = gw, req, rid, tracker
        self.exchange = exchange  # the pair serving the stream now
        self.streamed: list[int] = []  # token ids the client was sent, over every pair
        self.logprobs: dict[str, list] | None = None  # /generate's fields the client has
        self.moves = 0

    def abandon(self) -> None:
        """The client is gone (or the stream over): abort the request where it runs now."""
        self.exchange.abandon()

    async def events(self, exchange: Exchange, first: Events) -> AsyncIterator[bytes]:
        """The client's SSE stream; ends in `[DONE]`, after an error event if it failed."""
        try:
            while True:
                self.exchange = exchange
                try:
                    async with contextlib.aclosing(exchange.relay(first, self.tracker)) as relay:
                        async for data in relay:
                            yield data
                    return
                except StreamBroken as broken:
                    self.streamed.extend(exchange.streamed)
                    self._keep_logprobs(exchange)
                    if exchange.finished or exchange.ended_in_error:
                        yield DONE  # NOTE: the answer was whole (or refused): nothing to move
                        return
                    why_not = self._why_not_move(exchange)
                    if why_not is not None:
                        yield self._fail(broken.error, why_not)
                        return
                    moved = await self._move(exchange)
                    if isinstance(moved, bytes):
                        yield moved
                        return
                    exchange, first = moved
        finally:
            self.abandon()

    def _keep_logprobs(self, exchange: Exchange) -> None:
        """A /generate event holds every logprob so far: keep the last one's, for the next pair
        to go on from (api/resume.py); an exchange that sent nothing leaves the earlier ones."""
        if self.req.route != GENERATE or exchange.last_payload is None:
            return
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            meta = json.loads(exchange.last_payload)["meta_info"]
            fields = (*INPUT_LOGPROB_FIELDS, *OUTPUT_LOGPROB_FIELDS)
            self.logprobs = {name: meta[name] for name in fields if name in meta} or None

    def _why_not_move(self, exchange: Exchange) -> str | None:
        if not movable(self.gw, self.req):
            return "this stream cannot move (several sequences, or moves are off)"
        if exchange.untagged:
            return "its node did not say which tokens it sent"
        if self.moves >= self.gw.settings.max_migrations:
            return f"it moved {self.moves} times already (gateway.max_migrations)"
        return None

    async def _move(self, broken: Exchange) -> tuple[Exchange, Events] | bytes:
        """The next pair's exchange and first events, or the stream's last bytes if none."""
        self.moves += 1
        self.gw.metrics.migrations += 1
        dead = broken.pair.decode.url
        log_event(
            logging.WARNING,
            "migrate",
            self.rid,
            move=self.moves,
            after=dead,
            tokens=len(self.streamed),
        )
        try:
            exchange, answer = await open_request(
                self.gw,
                self.req,
                self.rid,
                resume=self.streamed,
                resume_logprobs=self.logprobs,
                move=self.moves,
                avoid=[dead],
            )
        except ApiError as exc:
            return self._fail(exc, "no pair took it over")
        if exchange is None or isinstance(answer, Finished):
            return self._fail(_refusal_error(answer), "the next pair refused it")
        return exchange, answer

    def _fail(self, error: ApiError, why: str) -> bytes:
        self.tracker.stream_failed()
        log_event(logging.WARNING, "stream_lost", self.rid, why=why, error=error.message)
        return error_event(error) + DONE


def _refusal_error(answer: Finished | Events) -> ApiError:
    """The error of a refused move, as the client's error event says it."""
    if isinstance(answer, Finished):
        try:
            error = json.loads(answer.body)["error"]
            code = error.get("code")
            message = str(error.get("message"))
            return ApiError(answer.status, message, code=None if code is None else str(code))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return server_error("the stream could not go on on another pair", 502)
