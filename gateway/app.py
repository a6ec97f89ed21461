"""`create_app(settings)`: the gateway's ASGI app (Starlette; its state lives in one `Gateway`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.errors import ApiError
from api.settings import GatewaySettings

from . import admin, routes
from .context import Gateway
from .health import HealthMonitor
from .requests import CHAT, COMPLETIONS, GENERATE


def create_app(settings: GatewaySettings, gateway: Gateway | None = None) -> Starlette:
    """The ASGI app; `gateway` lets tests hold the runtime state (seeded rng, fake clock)."""
    gw = gateway or Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        gw.spawn(HealthMonitor(gw).run())
        try:
            yield
        finally:
            await gw.stop()

    app = Starlette(
        routes=[
            Route(COMPLETIONS, routes.generation_route(COMPLETIONS), methods=["POST"]),
            Route(CHAT, routes.generation_route(CHAT), methods=["POST"]),
            Route(GENERATE, routes.generation_route(GENERATE), methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/workers", admin.workers, methods=["GET", "POST", "DELETE"]),
            Route("/workers/{url:path}", admin.worker_by_url, methods=["DELETE"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.state.gateway = gw
    return app


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405, in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    message = f"{where}: {exc.detail} (the gateway serves /v1/completions, /v1/chat/completions,"
    message += " /v1/models, /generate, /health, /metrics, /workers)"
    error = ApiError(exc.status_code, message, code=exc.status_code)
    return routes.error_response(error, routes.request_id(request))
