"""SGLang's PD protocol, as the gateway speaks it: the fields added to the body both nodes get
(`pd_body`), and one attempt's request as it goes out (`Attempt`). What the nodes' answers mean
is outcome.py's."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from api.resume import RESUME_IDS, RESUME_LOGPROBS, TOKEN_IDS

from .requests import Prepared
from .workers import Pair


@dataclass(frozen=True)
class Attempt:
    """One attempt of a request on one pair, with the exact bytes both nodes get."""

    req: Prepared
    rid: str  # the client's request id (logs, the X-Request-Id the nodes get)
    node_rid: str  # the `rid` in the body: `rid`, suffixed on retries (dispatch.attempt_rid)
    pair: Pair
    content: bytes

    @classmethod
    def make(
        cls,
        req: Prepared,
        rid: str,
        node_rid: str,
        pair: Pair,
        rng: random.Random,
        movable: bool = False,
        resume: Sequence[int] = (),
        logprobs: dict[str, list] | None = None,
    ) -> Attempt:
        """The attempt, with fresh bootstrap rooms drawn from `rng`. A `movable` stream asks
        for its events' token ids; `resume` goes on after those ids, whose /generate logprob
        fields the client got are `logprobs` (api/resume.py)."""
        body = pd_body(req, node_rid, pair, rng)
        if movable:
            body[TOKEN_IDS] = True
        if resume:
            body[RESUME_IDS] = list(resume)
        if resume and logprobs:
            body[RESUME_LOGPROBS] = logprobs
        return cls(req, rid, node_rid, pair, json.dumps(body).encode())


def pd_body(req: Prepared, rid: str, pair: Pair, rng: random.Random) -> dict[str, Any]:
    body = dict(req.body)
    body["rid"] = rid
    prefill = pair.prefill
    if prefill is None:
        return body  # colocated: the decode node prefills itself
    if req.rooms is None:
        body["bootstrap_host"] = prefill.host
        body["bootstrap_port"] = prefill.bootstrap_port
        body["bootstrap_room"] = rng.getrandbits(63)
    else:
        n = req.rooms
        body["bootstrap_host"] = [prefill.host] * n
        body["bootstrap_port"] = [prefill.bootstrap_port] * n
        body["bootstrap_room"] = [rng.getrandbits(63) for _ in range(n)]
    return body
