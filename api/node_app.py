"""The node HTTP API, shared by prefill and decode nodes (Starlette, served by uvicorn).

Routes: /generate (SGLang native), /v1/completions, /v1/chat/completions, /v1/models, /health,
/health_generate, /get_model_info, /get_server_info, /flush_cache, /metrics, /abort_request.
Requests are tokenized here and run by the scheduler process (see api/ipc.py); PD requests carry
bootstrap_host / bootstrap_port / bootstrap_room as SGLang's router sends them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api import node_format as fmt
from api import node_requests as nreq
from api.errors import ApiError, invalid_request
from api.ipc import SchedulerClient
from api.node_jobs import JobRun
from api.node_metrics import NodeMetrics
from api.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ResponseMessage,
    parse_request,
)
from api.settings import NodeSettings
from api.sse import DONE, MEDIA_TYPE, STREAM_HEADERS, encode_event, error_event

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"


@dataclass
class NodeContext:
    settings: NodeSettings
    client: SchedulerClient
    tokenizer: Any  # a transformers tokenizer
    model_name: str
    max_model_len: int
    alive: Callable[[], bool]
    request_timeout_s: float = 600.0
    metrics: NodeMetrics = field(default_factory=NodeMetrics)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise invalid_request("this model has no chat template (use /v1/completions)")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def request_id(request: Request, body: dict[str, Any]) -> str:
    rid = body.get("rid") or request.headers.get("x-request-id")
    return str(rid) if rid else uuid.uuid4().hex


async def read_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object")
    return body


def error_response(err: ApiError, rid: str | None = None) -> JSONResponse:
    headers = dict(err.headers)
    if rid:
        headers["X-Request-Id"] = rid
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class ClientGone(Exception):
    """The client closed the connection before its answer began (its jobs are aborted)."""


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def finish_or_abort(request: Request, work: Awaitable[Any], run: JobRun) -> Any:
    """Await work; if the client goes away first, abort the jobs and give up."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await run.close()
            raise ClientGone()
        return task.result()
    finally:
        watcher.cancel()


ChunkMaker = Callable[[fmt.JobState, Any], dict[str, Any] | None]


async def stream_jobs(
    run: JobRun, first: list, chunk: ChunkMaker, tail: Callable[[], list[dict]]
) -> AsyncIterator[bytes]:
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
) -> Callable[[], list[dict]]:
    """The stream's last chunk: usage with no choices, when stream_options.include_usage."""

    def tail() -> list[dict]:
        if not include:
            return []
        usage = fmt.usage_of(run.ordered)
        chunk = response(id=rid, created=created, model=model, choices=[], usage=usage)
        return [chunk.model_dump(exclude_none=True)]

    return tail


class NodeRoutes:
    """Handlers bound to one node's context."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    async def _start(self, request: Request, rid: str, jobs: list[nreq.Job]) -> tuple:
        run = JobRun(self.ctx.client, jobs, self.ctx.request_timeout_s)
        try:
            await run.start()
            first = await finish_or_abort(request, run.first_outputs(), run)
        except BaseException:
            await run.close()
            raise
        return run, first

    async def _finish(self, request: Request, run: JobRun) -> None:
        try:
            await finish_or_abort(request, run.rest(), run)
        finally:
            await run.close()

    async def completions(self, request: Request, body: dict, rid: str) -> Response:
        req = parse_request(CompletionRequest, body)
        prompts = nreq.completion_prompts(req, self.ctx.encode)
        params = nreq.openai_params(req, nreq.completion_max_tokens(req), req.logprobs)
        jobs = nreq.make_jobs(rid, prompts, params, req.n, body)
        run, first = await self._start(request, rid, jobs)
        created, model = int(time.time()), self.ctx.model_name
        want_lp = req.logprobs is not None

        def choice(state: fmt.JobState, text: str, ids, lps, tops, reason) -> CompletionChoice:
            logprobs = None
            if want_lp:
                logprobs = fmt.completion_logprobs(ids, lps, tops, self.ctx.token_text, 0)
            return CompletionChoice(
                index=state.job.index,
                text=text,
                logprobs=logprobs,
                finish_reason=reason,
                matched_stop=state.matched_stop if reason else None,
            )

        if req.stream:

            def chunk(state: fmt.JobState, out: Any) -> dict:
                reason = out.finish_reason if out.finished else None
                c = choice(
                    state, out.text_delta, out.token_ids, out.logprobs, out.top_logprobs, reason
                )
                resp = CompletionResponse(id=rid, created=created, model=model, choices=[c])
                return resp.model_dump(exclude_none=True)

            tail = usage_tail(req.include_usage, run, CompletionResponse, rid, created, model)
            return self._stream(run, first, chunk, tail, rid)
        await self._finish(request, run)
        choices = [
            choice(s, s.text, s.token_ids, s.logprobs, s.top_logprobs, s.finish_reason)
            for s in run.ordered
        ]
        resp = CompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=fmt.usage_of(run.ordered)
        )
        return self._json(resp.model_dump(exclude_none=True), rid, run)

    async def chat(self, request: Request, body: dict, rid: str) -> Response:
        req = parse_request(ChatCompletionRequest, body)
        messages = [{"role": m.role, "content": m.text} for m in req.messages]
        prompt = self.ctx.encode_chat(messages)
        max_tokens = nreq.chat_max_tokens(req, len(prompt), self.ctx.max_model_len)
        params = nreq.openai_params(req, max_tokens, nreq.chat_logprobs(req))
        jobs = nreq.make_jobs(rid, [prompt], params, req.n, body)
        run, first = await self._start(request, rid, jobs)
        created, model = int(time.time()), self.ctx.model_name

        def logprobs_of(ids, lps, tops):
            return fmt.chat_logprobs(ids, lps, tops, self.ctx.token_text) if req.logprobs else None

        if req.stream:
            started: set[int] = set()

            def chunk(state: fmt.JobState, out: Any) -> dict:
                index = state.job.index
                delta = DeltaMessage(content=out.text_delta)
                if index not in started:
                    started.add(index)
                    delta.role = "assistant"
                c = ChatChunkChoice(
                    index=index,
                    delta=delta,
                    logprobs=logprobs_of(out.token_ids, out.logprobs, out.top_logprobs),
                    finish_reason=out.finish_reason if out.finished else None,
                )
                resp = ChatCompletionChunk(id=rid, created=created, model=model, choices=[c])
                return resp.model_dump(exclude_none=True)

            tail = usage_tail(req.include_usage, run, ChatCompletionChunk, rid, created, model)
            return self._stream(run, first, chunk, tail, rid)
        await self._finish(request, run)
        choices = [
            {
                "index": s.job.index,
                "message": ResponseMessage(content=s.text).model_dump(),
                "logprobs": None
                if not req.logprobs
                else logprobs_of(s.token_ids, s.logprobs, s.top_logprobs).model_dump(),
                "finish_reason": s.finish_reason,
                "matched_stop": s.matched_stop,
            }
            for s in run.ordered
        ]
        resp = ChatCompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=fmt.usage_of(run.ordered)
        )
        return self._json(resp.model_dump(exclude_none=True), rid, run)

    async def generate(self, request: Request, body: dict, rid: str) -> Response:
        prompts, batch = nreq.native_prompts(body, self.ctx.encode)
        params = nreq.native_params(body)
        jobs = nreq.make_jobs(rid, prompts, params, 1, body)
        run, first = await self._start(request, rid, jobs)
        with_lp = bool(body.get("return_logprob"))

        def result(state: fmt.JobState) -> dict:
            elapsed = time.monotonic() - run.started
            return fmt.native_result(state, state.job.request.rid, elapsed, with_lp)

        if body.get("stream"):
            return self._stream(run, first, lambda s, _o: result(s), list, rid)
        await self._finish(request, run)
        results = [result(s) for s in run.ordered]
        return self._json(results if batch else results[0], rid, run)

    def _stream(self, run: JobRun, first: list, chunk: ChunkMaker, tail, rid: str) -> Response:
        self.ctx.metrics.observe_first_token(run.first_token_s)
        return StreamingResponse(
            stream_jobs(run, first, chunk, tail),
            media_type=MEDIA_TYPE,
            headers={**STREAM_HEADERS, "X-Request-Id": rid},
        )

    def _json(self, payload: Any, rid: str, run: JobRun) -> JSONResponse:
        self.ctx.metrics.observe_done(
            run.first_token_s, time.monotonic() - run.started, run.ordered
        )
        return JSONResponse(payload, headers={"X-Request-Id": rid})


def generation_route(handler: Callable[..., Awaitable[Response]], ctx: NodeContext, name: str):
    async def endpoint(request: Request) -> Response:
        rid = None
        try:
            body = await read_body(request)
            rid = request_id(request, body)
            response = await handler(request, body, rid)
        except ApiError as err:
            ctx.metrics.count(name, err.status)
            log.info("[%s] %s failed: %s", rid, name, err.message)
            return error_response(err, rid)
        except ClientGone:  # NOTE: e.g. the gateway gave up on this attempt; nobody reads this
            ctx.metrics.count(name, CLIENT_CLOSED)
            log.info("[%s] %s: the client went away", rid, name)
            return Response(status_code=CLIENT_CLOSED)
        ctx.metrics.count(name, response.status_code)
        return response

    return endpoint


def create_node_app(ctx: NodeContext) -> Starlette:
    from api.node_admin import NodeAdmin

    routes = NodeRoutes(ctx)
    admin = NodeAdmin(ctx)
    return Starlette(
        routes=[
            Route(
                "/generate", generation_route(routes.generate, ctx, "generate"), methods=["POST"]
            ),
            Route(
                "/v1/completions",
                generation_route(routes.completions, ctx, "completions"),
                methods=["POST"],
            ),
            Route(
                "/v1/chat/completions",
                generation_route(routes.chat, ctx, "chat_completions"),
                methods=["POST"],
            ),
            Route("/v1/models", admin.models, methods=["GET"]),
            Route("/health", admin.health, methods=["GET"]),
            Route("/health_generate", admin.health_generate, methods=["GET"]),
            Route("/get_model_info", admin.model_info, methods=["GET"]),
            Route("/get_server_info", admin.server_info, methods=["GET"]),
            Route("/flush_cache", admin.flush_cache, methods=["POST", "GET"]),
            Route("/metrics", admin.metrics, methods=["GET"]),
            Route("/abort_request", admin.abort_request, methods=["POST"]),
        ]
    )
