"""The node's generation routes, shared by prefill and decode nodes: /generate (SGLang native),
/v1/completions and /v1/chat/completions.

Requests are tokenized here and run by the scheduler process (node/channel.py); PD requests carry
bootstrap_host / bootstrap_port / bootstrap_room as SGLang's router sends them. A request whose
client leaves is aborted on the scheduler. A draining node refuses new requests (503, code
"draining") and counts the ones in flight (node/drain.py).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from api.errors import ApiError
from api.http import (
    ClientGone,
    ClientWatch,
    error_response,
    parse_json,
    read_body,
    request_id,
    until_disconnect,
)
from api.openai import ChatCompletionRequest, CompletionRequest, check_model, parse_request
from api.openai_responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
)
from api.resume import resume_ids, resume_logprobs, wants_token_ids
from api.sse import MEDIA_TYPE, STREAM_HEADERS
from node import prompt_logprobs as plp
from node import requests as nreq
from node import responses as fmt
from node.context import MAX_BODY_BYTES, NodeContext
from node.jobs import JobRun, JobState
from node.messages import TokenOutput
from node.streaming import ChunkMaker, chunk_payload, stream_jobs, usage_so_far, usage_tail
from node.tools import ChoiceWriter, finish_reason, tool_mode, with_tool_grammar

log = logging.getLogger(__name__)
T = TypeVar("T")
RID = re.compile(r"[\x21-\x7e]{1,256}")  # a body's rid: what a header and a log line can carry
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"
Handler = Callable[[Request, dict[str, Any], str], Awaitable[Response]]


class NodeRoutes:
    """Handlers bound to one node's context."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    async def completions(self, request: Request, body: dict, rid: str) -> Response:
        req = parse_request(CompletionRequest, body)
        check_model(req.model, {self.ctx.model_name}, "this node")
        prompts = nreq.completion_prompts(req, self.ctx.encode)
        budget = nreq.completion_budget(req, body).for_prompts(prompts, self.ctx.max_model_len)
        params = nreq.openai_params(req, req.logprobs)
        jobs = nreq.make_jobs(rid, prompts, params, req.n, body, budget)
        # echo: each choice's text starts with its prompt's (as sent, or decoded from its ids)
        echoes = [self._prompt_text(p) if req.echo else "" for p in req.prompts]
        run, first = await self._start(request, jobs)
        created, model, text_of = int(time.time()), self.ctx.model_name, self.ctx.token_text

        def choice(
            state: JobState, out: TokenOutput, reason: str | None, echo: str, start: int
        ) -> CompletionChoice:
            """`echo`: the prompt's text, which leads this choice (and its tokens its logprobs,
            with echo_logprobs); `start`: the text offset of the first token."""
            logprobs = None
            if req.logprobs is not None:
                entries = fmt.output_entries(out)
                if echo and req.echo_logprobs:
                    entries = self._echo_entries(run, state, req.logprobs) + entries
                logprobs = fmt.completion_logprobs(entries, text_of, start)
            prompt_logprobs = None
            if req.answered_prompt_logprobs is not None:
                prompt, source = self._prompt_source(run, state)
                top = req.answered_prompt_logprobs
                prompt_logprobs = plp.vllm_prompt_logprobs(prompt, source, top, text_of)
            return CompletionChoice(
                index=state.job.index,
                text=echo + out.text,
                logprobs=logprobs,
                finish_reason=reason,
                matched_stop=state.out.matched_stop if reason else None,
                stop_reason=fmt.stop_reason(state.out.matched_stop, params) if reason else None,
                prompt_logprobs=prompt_logprobs,
            )

        if req.stream:
            # a resumed stream (api/resume.py) echoed its prompt on the node it came from
            echoed = {s.job.index for s in run.states.values() if s.job.request.num_resumed}
            offsets: dict[int, int] = {}  # each choice's text_offset of its next token

            def chunk(state: JobState, out: TokenOutput) -> dict:
                index = state.job.index
                echo = "" if index in echoed else echoes[state.job.prompt_index]
                echoed.add(index)
                if req.logprobs is not None and index not in offsets:
                    offsets[index] = self._offset_before(state, out, req.echo_logprobs)
                reason = out.finish_reason if out.finished else None
                c = choice(state, out, reason, echo, offsets.get(index, 0))
                if c.logprobs is not None:
                    offsets[index] += sum(len(token) for token in c.logprobs.tokens)
                usage = usage_so_far(req.continuous_usage, state)
                resp = CompletionResponse(
                    id=rid, created=created, model=model, choices=[c], usage=usage
                )
                return chunk_payload(resp, reason)

            tail = usage_tail(req.include_usage, run, CompletionResponse, rid, created, model)
            return self._stream(run, first, chunk, tail, rid, wants_token_ids(body))
        await self._finish(request, run)
        choices = [
            choice(s, s.out, s.out.finish_reason, echoes[s.job.prompt_index], 0)
            for s in run.ordered
        ]
        usage = fmt.usage_of(run.ordered)
        resp = CompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=usage
        )
        payload = resp.model_dump(exclude_none=True)
        for choice in payload["choices"]:
            choice.setdefault("stop_reason", None)  # NOTE: vLLM's, null as vLLM writes it
        return self._json(payload, rid, run)

    def _prompt_source(self, run: JobRun, state: JobState) -> tuple[list[int], TokenOutput]:
        """A job's prompt and the output carrying its logprobs."""
        return _prompt_of(state), run.first_of(state.job.prompt_index).out

    def _echo_entries(self, run: JobRun, state: JobState, top: int) -> plp.Entries:
        return plp.echo_entries(*self._prompt_source(run, state), top)

    def _offset_before(self, state: JobState, out: TokenOutput, echo_logprobs: bool) -> int:
        """The text offset of a stream's first chunk of `state`'s choice: 0, or where a
        resumed stream's first node left it (after the prompt's tokens, with echo_logprobs)."""
        seen = state.out.token_ids[: len(state.out.token_ids) - len(out.token_ids)]
        resumed_echo = echo_logprobs and state.job.request.num_resumed > 0
        return self._text_length(_prompt_of(state) if resumed_echo else []) + self._text_length(
            seen
        )

    def _prompt_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.ctx.tokenizer.decode(prompt)

    def _text_length(self, ids: list[int]) -> int:
        """Characters of `ids`' token texts: how far logprobs' text_offset moves over them."""
        return sum(len(self.ctx.token_text(t)) for t in ids)

    async def chat(self, request: Request, body: dict, rid: str) -> Response:
        req = parse_request(ChatCompletionRequest, body)
        check_model(req.model, {self.ctx.model_name}, "this node")
        options = req.template_options()
        prompt = self.ctx.encode_chat(req.chat_messages(), req.template_tools(), options)
        budget = nreq.chat_budget(req, body).for_prompts([prompt], self.ctx.max_model_len)
        tools = tool_mode(req, self.ctx.tool_parser)
        params = with_tool_grammar(nreq.openai_params(req, nreq.chat_logprobs(req)), tools)
        jobs = nreq.make_jobs(rid, [prompt], params, req.n, body, budget)
        run, first = await self._start(request, jobs)
        created, model = int(time.time()), self.ctx.model_name
        reasoning = self.ctx.settings.reasoning_parser
        if (req.model_extra or {}).get("separate_reasoning") is False:
            reasoning = None

        def logprobs_of(out: TokenOutput) -> Any:
            if not req.logprobs:
                return None
            return fmt.chat_logprobs(
                out.token_ids, out.logprobs, out.top_logprobs, self.ctx.token_text
            )

        if req.stream:
            writers = {j.index: ChoiceWriter(reasoning, tools) for j in jobs}
            # a resumed stream (api/resume.py) said "assistant" and its text on the node it came
            # from: the writer reads that text first, and says only what follows
            started = set()
            for state in run.states.values():
                if state.job.request.num_resumed:
                    started.add(state.job.index)
                    writers[state.job.index].delta(state.out.text, False)

            def chunk(state: JobState, out: TokenOutput) -> dict | None:
                index, writer = state.job.index, writers[state.job.index]
                delta = writer.delta(out.text, out.finished)
                said = delta.content or delta.reasoning_content or delta.tool_calls
                if not (said or out.finished or index not in started):
                    return None  # a marker's first characters: said with the next delta
                if index not in started:
                    started.add(index)
                    delta.role = "assistant"
                reason = out.finish_reason if out.finished else None
                reason = finish_reason(reason, writer.streamed_calls)
                stopped = fmt.stop_reason(state.out.matched_stop, params) if reason else None
                c = ChatChunkChoice(
                    index=index,
                    delta=delta,
                    logprobs=logprobs_of(out),
                    finish_reason=reason,
                    stop_reason=stopped,
                )
                usage = usage_so_far(req.continuous_usage, state)
                resp = ChatCompletionChunk(
                    id=rid, created=created, model=model, choices=[c], usage=usage
                )
                return chunk_payload(resp, reason)

            tail = usage_tail(req.include_usage, run, ChatCompletionChunk, rid, created, model)
            return self._stream(run, first, chunk, tail, rid, wants_token_ids(body))
        await self._finish(request, run)
        choices = []
        for s in run.ordered:
            logprobs = logprobs_of(s.out)
            message = ChoiceWriter(reasoning, tools).message(s.out.text)
            choices.append(
                {
                    "index": s.job.index,
                    "message": message.model_dump(exclude_none=True),
                    "logprobs": None if logprobs is None else logprobs.model_dump(),
                    "finish_reason": finish_reason(s.out.finish_reason, bool(message.tool_calls)),
                    "matched_stop": s.out.matched_stop,
                    "stop_reason": fmt.stop_reason(s.out.matched_stop, params),
                }
            )
        usage = fmt.usage_of(run.ordered)
        resp = ChatCompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=usage
        )
        if req.answered_prompt_logprobs is not None:  # vLLM's: the prompt's, beside the choices
            prompt, source = self._prompt_source(run, run.ordered[0])
            top = req.answered_prompt_logprobs
            resp.prompt_logprobs = plp.vllm_prompt_logprobs(
                prompt, source, top, self.ctx.token_text
            )
        payload = resp.model_dump(exclude_none=True)
        for choice in payload["choices"]:  # NOTE: OpenAI says content: null beside tool calls
            choice["message"].setdefault("content", None)
            choice.setdefault("stop_reason", None)
        return self._json(payload, rid, run)

    async def generate(self, request: Request, body: dict, rid: str) -> Response:
        prompts, batch = nreq.native_prompts(body, self.ctx.encode)
        budget = nreq.native_budget(body).for_prompts(prompts, self.ctx.max_model_len)
        params = nreq.native_params(body)
        nreq.check_logprob_start(body, prompts)
        jobs = nreq.make_jobs(rid, prompts, params, 1, body, budget)
        stream, logprobs = nreq.native_flag(body, "stream"), None
        if "logprobs" in params:
            with_text = nreq.native_flag(body, "return_text_in_logprobs")
            text_of = self.ctx.token_text if with_text else None
            start = nreq.logprob_start(body)
            carried = resume_logprobs(body, len(resume_ids(body)))
            logprobs = fmt.NativeLogprobs(params["logprobs"], start, text_of, carried)
        run, first = await self._start(request, jobs)

        def result(state: JobState) -> dict:
            latency = time.monotonic() - run.started
            return fmt.native_result(state.out, latency, logprobs, _prompt_of(state))

        if stream:
            tag = wants_token_ids(body)
            return self._stream(run, first, lambda s, _o: result(s), list, rid, tag)
        await self._finish(request, run)
        results = [result(s) for s in run.ordered]
        return self._json(results if batch else results[0], rid, run)

    # ---- running the jobs ----

    async def _start(
        self, request: Request, jobs: list[nreq.Job]
    ) -> tuple[JobRun, list[tuple[JobState, TokenOutput]]]:
        """Submit the jobs and wait for every job's first output."""
        run = JobRun(self.ctx.client, jobs, self.ctx.request_timeout_s, self.ctx.drain)
        for state in run.states.values():
            if state.job.request.num_resumed:
                state.out = self.ctx.resumed_output(state.job.request)
        try:
            await run.start()
            first = await _unless_client_leaves(request, run.first_outputs())
        except BaseException:
            await run.close()
            raise
        return run, first

    async def _finish(self, request: Request, run: JobRun) -> None:
        try:
            await _unless_client_leaves(request, run.rest())
        finally:
            await run.close()

    def _stream(
        self,
        run: JobRun,
        first: list[tuple[JobState, TokenOutput]],
        chunk: ChunkMaker,
        tail: Callable[[], list[dict]],
        rid: str,
        tag: bool,
    ) -> Response:
        self.ctx.metrics.observe_first_token(run.first_token_s)
        return StreamingResponse(
            stream_jobs(run, first, chunk, tail, tag),
            media_type=MEDIA_TYPE,
            headers={**STREAM_HEADERS, "X-Request-Id": rid},
        )

    def _json(self, payload: Any, rid: str, run: JobRun) -> JSONResponse:
        elapsed = time.monotonic() - run.started
        self.ctx.metrics.observe_done(run.first_token_s, elapsed, run.ordered)
        return JSONResponse(payload, headers={"X-Request-Id": rid})


def _prompt_of(state: JobState) -> list[int]:
    """A job's prompt as the client sent it (a resumed stream's output left out)."""
    req = state.job.request
    return req.prompt_ids[: len(req.prompt_ids) - req.num_resumed]


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; raises ClientGone if the client leaves first (the caller aborts)."""
    watch = ClientWatch(request.receive)
    try:
        return await until_disconnect(watch, work)
    finally:
        watch.stop()  # NOTE: a StreamingResponse listens to `receive` itself afterwards


def generation_route(handler: Handler, ctx: NodeContext, name: str) -> Callable:
    """The endpoint: body and rid, the handler, errors in OpenAI's shape, counted by status;
    while the node drains, a refusal."""

    async def endpoint(request: Request) -> Response:
        if ctx.drain.draining:  # NOTE: before reading the body: new work goes elsewhere at once
            ctx.metrics.count(name, 503)
            return error_response(ctx.drain.refusal(), request_id(request.headers))
        with ctx.drain.handling():
            return await handle(request)

    async def handle(request: Request) -> Response:
        rid = None
        try:
            body = parse_json(await read_body(request, MAX_BODY_BYTES))
            rid = body_rid(body, request)
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


def body_rid(body: dict[str, Any], request: Request) -> str:
    """The request's id: the body's `rid` (SGLang's; the gateway sends one), else the header's
    or a fresh one. It lands in headers and logs: a 400 unless it is a plain token."""
    rid = body.get("rid")
    if rid is None or rid == "":
        return request_id(request.headers)
    if not isinstance(rid, str) or not RID.fullmatch(rid):
        raise ApiError(
            400,
            "rid must be a string of 1-256 printable ASCII characters without spaces (it names "
            "the request in headers and logs)",
            param="rid",
        )
    return rid
