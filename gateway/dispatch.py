"""A request's attempts: pick a pair, open an exchange, retry on another pair while nothing has
reached the client (at most `max_retries` more times)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from api.errors import ApiError, server_error

from .context import Gateway
from .events import Events
from .exchange import Exchange
from .logs import log_event
from .outcome import AttemptFailed, Finished, Refused
from .pd import Attempt
from .requests import Prepared


def attempt_rid(rid: str, attempt: int, move: int = 0) -> str:
    """The `rid` the nodes see: the request id, suffixed on retries and moves so that a node
    still dropping an aborted attempt never sees the same rid twice."""
    base = rid if move == 0 else f"{rid}-m{move}"
    return base if attempt == 0 else f"{base}-retry{attempt}"


def movable(gw: Gateway, req: Prepared) -> bool:
    """Can `req`'s stream move to another pair mid-stream? One sequence, streamed, allowed."""
    return req.stream and req.rooms is None and gw.settings.max_migrations > 0


async def open_request(
    gw: Gateway,
    req: Prepared,
    rid: str,
    *,
    resume: Sequence[int] = (),
    resume_logprobs: dict[str, list] | None = None,
    move: int = 0,
    avoid: Sequence[str] = (),
) -> tuple[Exchange | None, Finished | Events]:
    """The exchange that answers `req` with its whole answer or first stream events.

    A refusal (a node's 4xx) comes back as `(None, answer)`; when every attempt fails, the last
    failure is raised as a 502 `ApiError` (503 when no instance can take requests at all).
    `move` > 0: the stream's move number `move`, going on after the ids in `resume` (and the
    /generate logprob fields `resume_logprobs`), on a pair without the instances in `avoid`
    where others can serve.
    """
    attempts = gw.settings.max_retries + 1
    failed: list[str] = list(avoid)
    last: AttemptFailed | None = None
    tagged = movable(gw, req)
    for number in range(attempts):
        try:
            pair = gw.pick_pair(req.key, failed, req.colocated)
        except ApiError:
            if last is None:
                raise
            break  # NOTE: the failure says more than "no instance left"
        node_rid = attempt_rid(rid, number, move)
        log_event(logging.DEBUG, "attempt", rid, number=number, decode=pair.decode.url,
                  prefill=pair.prefill.url if pair.prefill else "none")  # fmt: skip
        attempt = Attempt.make(req, rid, node_rid, pair, gw.rng, tagged, resume, resume_logprobs)
        exchange = Exchange(attempt, gw.upstream, gw.tasks, gw.clock, gw.settings)
        try:
            return exchange, await exchange.open()
        except Refused as refused:
            return None, refused.answer
        except AttemptFailed as exc:
            failed.append(exc.url)
            last = exc
            if exc.draining:
                gw.metrics.draining_refusals += 1
            if number + 1 < attempts:
                gw.metrics.retries += 1
                log_event(logging.WARNING, "retry", rid, attempt=number + 1, after=exc.url)
    assert last is not None
    return _give_up(last, len(failed) - len(avoid))


def _give_up(last: AttemptFailed, tries: int) -> tuple[Exchange | None, Finished]:
    error = last.error
    raise server_error(
        f"{error.message} (gave up after {tries} attempt{'s' if tries > 1 else ''})",
        502,
        code=error.code or "upstream_error",
    )
