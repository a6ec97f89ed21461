"""The node's non-generation routes: models, health, info, cache, metrics, aborts."""

from __future__ import annotations

import dataclasses
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from api.errors import DRAINING, ApiError, invalid_request
from api.http import error_response, parse_json, read_body
from api.openai_responses import ModelCard, ModelList
from node import requests as nreq
from node.context import NodeContext
from node.jobs import JobRun
from node.messages import AbortRequest, GenerateRequest

MAX_ADMIN_BODY = 64 * 1024


class NodeAdmin:
    """The non-generation routes."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    async def models(self, _request: Request) -> Response:
        card = ModelCard(
            id=self.ctx.model_name,
            root=self.ctx.settings.model,
            max_model_len=self.ctx.max_model_len,
        )
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def health(self, _request: Request) -> Response:
        if not self.ctx.alive():
            return PlainTextResponse("scheduler process is not running", status_code=503)
        if self.ctx.drain.draining:  # NOTE: the gateway takes a draining node out at once
            return JSONResponse({"status": DRAINING}, status_code=503)
        return PlainTextResponse("ok")

    async def health_generate(self, request: Request) -> Response:
        if self.ctx.drain.draining:
            return await self.health(request)
        rid = f"health-{uuid.uuid4().hex}"
        params = {"max_tokens": 1, "temperature": 0.0}
        job = nreq.Job(0, 0, GenerateRequest(rid, self.ctx.encode("ping") or [0], params))
        run = JobRun(self.ctx.client, [job], 20.0, self.ctx.drain)
        try:
            await run.start()
            await run.rest()
        except ApiError as err:
            return PlainTextResponse(f"generation failed: {err.message}", status_code=503)
        finally:
            await run.close()
        return PlainTextResponse("ok")

    async def model_info(self, _request: Request) -> Response:
        return JSONResponse(
            {
                "model_path": self.ctx.settings.model,
                "tokenizer_path": self.ctx.settings.model,
                "is_generation": True,
                "served_model_name": self.ctx.model_name,
                "max_model_len": self.ctx.max_model_len,
            }
        )

    async def server_info(self, _request: Request) -> Response:
        reply = await self.ctx.client.call("server_info")
        s = self.ctx.settings
        info = {
            "name": s.name,
            "model_path": s.model,
            "served_model_name": self.ctx.model_name,
            "bootstrap_port": s.transfer.bootstrap_port if s.role == "prefill" else None,
            "transfer_backend": s.transfer.backend,
            "engine": dataclasses.asdict(s.engine),
            **reply.data,
        }
        return JSONResponse(info)

    async def check_integrity(self, _request: Request) -> Response:
        """Every KV page is free, in the prefix cache, or held by exactly one live request: what
        soak and chaos runs ask each node once the cluster is idle (500 names the first fault)."""
        reply = await self.ctx.client.call("check_integrity")
        if not reply.ok:
            error = reply.data.get("error", "integrity check failed")
            return JSONResponse({"ok": False, "error": error}, status_code=500)
        return JSONResponse({"ok": True})

    async def flush_cache(self, _request: Request) -> Response:
        reply = await self.ctx.client.call("flush_cache")
        if not reply.ok:
            return PlainTextResponse("requests are running; cache not flushed", status_code=400)
        return PlainTextResponse("cache flushed")

    async def metrics(self, _request: Request) -> Response:
        info = (await self.ctx.client.call("server_info")).data
        return PlainTextResponse(self.ctx.metrics.render(info, self.ctx.settings))

    async def abort_request(self, request: Request) -> Response:
        try:
            body = parse_json(await read_body(request, MAX_ADMIN_BODY))
        except ApiError as err:
            return error_response(err, None)
        rid = body.get("rid")
        if not rid:
            return error_response(invalid_request("abort_request needs a rid", param="rid"), None)
        rid = str(rid)
        # a request with several prompts or samples runs as jobs "<rid>-<i>"
        jobs = [r for r in self.ctx.client.open_rids() if nreq.is_job_of(r, rid)]
        for job in [rid, *jobs]:
            await self.ctx.client.send(AbortRequest(job))
        return JSONResponse({"rid": rid, "aborted": True})
