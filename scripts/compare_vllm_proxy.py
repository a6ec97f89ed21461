"""The proxy in front of a vLLM 1P1D (two api_servers with the NixlConnector), as vLLM's own
tests/v1/kv_connector/nixl_integration/toy_proxy_server.py does it, for scripts/compare_vllm.py.

Each /v1/completions (or /v1/chat/completions) request goes first to the prefill server with
`max_tokens: 1`, no streaming and `kv_transfer_params: {"do_remote_decode": true, ...}`; the
prefill answers with the `kv_transfer_params` that tell the decode server where the KV blocks
are (engine id, host, side-channel port, block ids, request id). Then the original request goes
to the decode server with those `kv_transfer_params`, and the decode's response (an SSE stream
when the client asked for one) is streamed back as it comes. Both legs carry one X-Request-Id.

    python scripts/compare_vllm_proxy.py --port 8192 \
        --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
"""

from __future__ import annotations

import argparse
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# What the prefill leg asks for: compute the prompt's KV and keep it for a remote decode.
PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# Sampling fields the prefill leg must not get (vLLM rejects them with max_tokens 1).
DECODE_ONLY = ("min_tokens", "min_completion_tokens", "stream_options")


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the prefill server gets it: one token, no stream, KV kept for decode."""
    out = {k: v for k, v in body.items() if k not in DECODE_ONLY}
    out.update(kv_transfer_params=dict(PREFILL_KV_PARAMS), stream=False, max_tokens=1)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


def decode_body(body: dict[str, Any], prefill_answer: dict[str, Any]) -> dict[str, Any]:
    """The original request with the prefill's `kv_transfer_params` (where its KV blocks are)."""
    params = prefill_answer.get("kv_transfer_params")
    return {**body, "kv_transfer_params": params} if params else dict(body)


class PdProxy:
    """Routes each request prefill-then-decode; one client per side, kept alive."""

    def __init__(self, prefill: httpx.AsyncClient, decode: httpx.AsyncClient) -> None:
        self.prefill = prefill
        self.decode = decode

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        headers = {"X-Request-Id": request.headers.get("x-request-id") or uuid.uuid4().hex}
        path = request.url.path
        first = await self.prefill.post(path, json=prefill_body(body), headers=headers)
        if first.status_code != 200:
            return passthrough(first)
        upstream = self.decode.build_request(
            "POST", path, json=decode_body(body, first.json()), headers=headers
        )
        answer = await self.decode.send(upstream, stream=True)
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type"),
            background=BackgroundTask(answer.aclose),
        )

    async def models(self, request: Request) -> Response:
        return passthrough(await self.decode.get("/v1/models"))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await self.prefill.aclose()
        await self.decode.aclose()


def passthrough(answer: httpx.Response) -> Response:
    return Response(
        answer.content,
        status_code=answer.status_code,
        media_type=answer.headers.get("content-type"),
    )


def build_app(proxy: PdProxy) -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/completions", proxy.generate, methods=["POST"]),
            Route("/v1/chat/completions", proxy.generate, methods=["POST"]),
            Route("/v1/models", proxy.models, methods=["GET"]),
            Route("/health", proxy.health, methods=["GET"]),
        ],
        lifespan=proxy.lifespan,
    )


def upstream_client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(None, connect=30.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,  # NOTE: loopback servers; never through an HTTP proxy from the env
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefill", required=True, help="prefill server URL, http://HOST:PORT")
    p.add_argument("--decode", required=True, help="decode server URL, http://HOST:PORT")
    args = p.parse_args()
    proxy = PdProxy(upstream_client(args.prefill), upstream_client(args.decode))
    uvicorn.run(build_app(proxy), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
