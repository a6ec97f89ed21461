"""A controllable upstream for fault tests: a real HTTP server that speaks the node routes the
gateway uses and fails on demand (HTTP 500, a cut stream, a hang, failing health checks).

It is not a model of our nodes' behaviour; tests that need real answers drive real nodes
(test_gateway_nodes.py). It records what it received, so tests can check the PD protocol fields.
Asked for token ids (`pd_token_ids`), its stream's token i has id `TOKEN_BASE + i`, and a request
resumed after k ids (`pd_resume_ids`) starts at token k, as a node that took a stream over does.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.errors import error_body
from api.resume import RESUME_LOGPROBS, ids_comment, resume_ids, wants_token_ids
from api.sse import DONE, encode_event

GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
TOKEN_BASE = 100  # token i's id in tagged streams
TURN_TIMEOUT_S = 20.0  # a turn that never comes fails the test rather than hanging it


@dataclass
class Behavior:
    mode: str = "ok"  # ok | error500 | error400 | hang | cut | error_event | draining
    # Answer a rid only once one of these stand-ins has answered it with a success (a decode node
    # waits for prefill's KV), or once the gateway has aborted it here (that attempt is over).
    # It orders the two sides of an attempt by what happened, not by how long a sleep lasts.
    after: list[StandIn] = field(default_factory=list)
    events: int = 3  # events in a stream
    event_delay_s: float = 0.0
    hang_after: int = 1  # mode "hang" on a stream: events sent before hanging
    healthy: bool = True
    draining: bool = False  # /health answers as a draining node does (503 {"status": "draining"})


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class StandIn:
    name: str
    model: str = "tiny"
    behavior: Behavior = field(default_factory=Behavior)
    received: list[Received] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    health_checks: int = 0
    cancelled: list[str] = field(default_factory=list)  # rids whose handler was cancelled
    succeeded: set[str] = field(default_factory=set)  # rids answered with a success
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        routes = [Route(p, self.generate, methods=["POST"]) for p in GENERATION_ROUTES]
        routes += [
            Route("/health", self.health),
            Route("/v1/models", self.models),
            Route("/abort_request", self.abort, methods=["POST"]),
        ]
        return Starlette(routes=routes)

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [r.body for r in self.received if path is None or r.path == path]

    async def health(self, request: Request) -> Response:
        self.health_checks += 1
        if self.behavior.draining:
            return JSONResponse({"status": "draining"}, 503)
        return Response(status_code=200 if self.behavior.healthy else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def abort(self, request: Request) -> Response:
        self.aborts.append((await request.json())["rid"])
        return JSONResponse({"ok": True})

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        with self.lock:
            self.received.append(Received(request.url.path, dict(request.headers), body))
        b, rid = self.behavior, body.get("rid")
        try:
            # NOTE: a body without a room (colocated) waits for no prefill, as a decode node
            if not await self.wait_turn(rid if "bootstrap_room" in body else None):
                return JSONResponse(error_body(f"{self.name}: {rid} aborted", "server_error"), 500)
            if b.mode == "hang" and not body.get("stream"):
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise
        if b.mode == "error500":
            return JSONResponse(error_body(f"{self.name} broke", "server_error"), 500)
        if b.mode == "draining":  # as a node that shuts down refuses new work
            refusal = error_body(f"{self.name} is draining", "server_error", code="draining")
            return JSONResponse(refusal, 503)
        if b.mode == "error400":
            refusal = error_body(f"{self.name} refuses", param="prompt", code="invalid_prompt")
            return JSONResponse(refusal, 400)
        with self.lock:
            self.succeeded.add(rid)
        if body.get("stream"):
            native = request.url.path == "/generate" and body.get("return_logprob") is True
            return StreamingResponse(self.events(body, native), media_type="text/event-stream")
        return JSONResponse(self.answer(body, "".join(self.tokens())))

    async def wait_turn(self, rid: str | None) -> bool:
        """True once one of `behavior.after` answered `rid` with a success (at once without
        any, or without a rid); False once the gateway aborted `rid` here."""
        after = self.behavior.after if rid is not None else []
        deadline = asyncio.get_running_loop().time() + TURN_TIMEOUT_S
        while after and not any(s.has_succeeded(rid) for s in after):
            if rid in self.aborts:
                return False
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{self.name}: {rid} was neither answered first nor aborted")
            await asyncio.sleep(0.005)  # NOTE: polled: the stand-ins run on different loops
        return True

    def has_succeeded(self, rid: str) -> bool:
        with self.lock:
            return rid in self.succeeded

    def tokens(self, start: int = 0) -> list[str]:
        return [f"{self.name}-t{i} " for i in range(start, self.behavior.events)]

    def answer(self, body: dict[str, Any], text: str) -> dict[str, Any]:
        usage = {"prompt_tokens": 5, "completion_tokens": self.behavior.events, "total_tokens": 8}
        usage["prompt_tokens_details"] = {"cached_tokens": 2}
        return {
            "id": f"cmpl-{body.get('rid')}",
            "object": "text_completion",
            "created": 0,
            "model": self.model,
            "node": self.name,
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": usage,
        }

    async def events(self, body: dict[str, Any], native: bool = False) -> Any:
        b = self.behavior
        if b.mode == "error_event":
            yield encode_event(error_body(f"{self.name} failed", "server_error"))
            yield DONE
            return
        tag, start = wants_token_ids(body), len(resume_ids(body))
        for i, token in enumerate(self.tokens(start)):
            if b.mode == "hang" and i == b.hang_after:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    self.cancelled.append(body.get("rid"))
                    raise
            if b.mode == "cut" and i == b.hang_after:
                raise ConnectionResetError(f"{self.name} cut the stream")  # uvicorn drops it
            await asyncio.sleep(b.event_delay_s)
            payload = self.native_event(body, start + i) if native else self.answer(body, token)
            event = encode_event(payload)
            if tag:
                last = start + i == b.events - 1
                event = ids_comment([TOKEN_BASE + start + i], finished=last) + event
            yield event
        yield DONE

    def native_event(self, body: dict[str, Any], last: int) -> dict[str, Any]:
        """/generate's event after token `last` with return_logprob: the whole output so far.
        Each logprob entry names the node that computed it; a resumed stream's earlier entries
        are those its body carried (`pd_resume_logprobs`), as a node keeps them."""
        start, carried = len(resume_ids(body)), body.get(RESUME_LOGPROBS) or {}
        earlier = carried.get("output_token_logprobs") or [
            [None, TOKEN_BASE + k, None] for k in range(start)
        ]
        own = [[-(k + 1) / 10, TOKEN_BASE + k, self.name] for k in range(start, last + 1)]
        meta = {
            "id": body.get("rid"),
            "input_token_logprobs": carried.get("input_token_logprobs") or [[None, 1, self.name]],
            "output_token_logprobs": [*earlier, *own],
        }
        ids = [TOKEN_BASE + k for k in range(last + 1)]
        return {"text": "".join(self.tokens()[: last + 1]), "output_ids": ids, "meta_info": meta}


def body_json(text: bytes) -> Any:
    return json.loads(text)
