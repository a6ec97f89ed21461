"""`create_app(settings)`: the gateway's ASGI app (Starlette; its state lives in one `Gateway`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from api.http import docs, openai_http_errors, openapi_json, version
from api.openapi import (
    INSTANCE_SCHEMA,
    Operation,
    generation_operations,
    openapi_document,
    tokenize_operations,
    with_models,
)
from api.settings import GatewaySettings

from . import admin, routes
from .context import Gateway
from .health import HealthMonitor
from .passthrough import tokenizing
from .requests import CHAT, COMPLETIONS, GENERATE
from .stats_log import log_stats

Endpoint = Callable[[Request], Awaitable[Response]]
SERVED = (
    "/v1/completions, /v1/chat/completions, /v1/models, /generate, /health, /metrics, /workers, "
    "/openapi.json, /docs"
)
GATEWAY_DOC = openapi_document(
    "pdserve gateway",
    "1",
    [
        *generation_operations(),
        Operation("/v1/models", "get", "the served models"),
        Operation("/health", "get", "200 while a request could be served, else 503"),
        Operation("/metrics", "get", "Prometheus metrics", answers="text/plain"),
        Operation("/workers", "get", "the instances (admin key)", tags=("admin",)),
        Operation("/workers", "post", "add an instance (admin key)", "Instance", tags=("admin",)),
        Operation("/workers", "delete", "remove an instance (admin key)", "Instance",
                  tags=("admin",)),
        Operation("/workers/{url}", "delete", "remove the instance at url (admin key)",
                  tags=("admin",)),
        *tokenize_operations(),
        Operation("/openapi.json", "get", "this document"),
        Operation("/docs", "get", "this document in Swagger UI", answers="text/html"),
    ],
    {"Instance": INSTANCE_SCHEMA},
)  # fmt: skip


def create_app(settings: GatewaySettings, gateway: Gateway | None = None) -> GatewayApp:
    """The ASGI app; `gateway` lets tests hold the runtime state (seeded rng, fake clock)."""
    gw = gateway or Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        gw.tasks.spawn(HealthMonitor(gw).run())
        gw.tasks.spawn(log_stats(settings.log_stats_interval_s, gw.stats_sample))
        try:
            yield
        finally:
            await gw.stop()

    generation = {route: routes.generation_route(route) for route in (COMPLETIONS, CHAT, GENERATE)}
    app = GatewayApp(
        generation,
        routes=[
            *(Route(path, endpoint, methods=["POST"]) for path, endpoint in generation.items()),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/workers", admin.workers, methods=["GET", "POST", "DELETE"]),
            Route("/workers/{url:path}", admin.worker_by_url, methods=["DELETE"]),
            Route("/tokenize", tokenizing, methods=["POST"]),
            Route("/detokenize", tokenizing, methods=["POST"]),
            Route("/version", version, methods=["GET"]),
            Route(
                "/openapi.json",
                openapi_json(lambda: with_models(GATEWAY_DOC, gw.models)),
                methods=["GET"],
            ),
            Route("/docs", docs(GATEWAY_DOC), methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: openai_http_errors(SERVED)},
    )
    app.state.gateway = gw
    return app


class GatewayApp(Starlette):
    """Starlette, except that a POST to a generation route goes straight to its endpoint.

    Those endpoints answer every failure themselves (OpenAI's shape, see `routes.generate`), so
    Starlette's error middleware and router only cost time there (a few wrappers around every
    `send` of a stream); any other request, and any other path spelling, takes the full stack.
    """

    def __init__(self, fast: dict[str, Endpoint], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast = fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = None
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.fast.get(scope["path"])
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)
