"""`create_node_app(ctx)`: the node's ASGI app (Starlette), the same for prefill and decode.

Routes: /generate, /v1/completions, /v1/chat/completions (node/routes.py); /v1/models, /health,
/health_generate, /get_model_info, /get_server_info, /flush_cache, /check_integrity, /metrics,
/abort_request (node/admin.py); /tokenize, /detokenize (node/tokenize.py), /version;
/openapi.json and /docs (api/openapi.py). Starlette's own
404/405 answer in OpenAI's shape.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from api.http import docs, openai_http_errors, openapi_json, version
from api.openapi import Operation, generation_operations, openapi_document, tokenize_operations
from node.admin import NodeAdmin
from node.context import NodeContext
from node.routes import NodeRoutes, generation_route
from node.tokenize import Tokenizing

ABORT_SCHEMA = {
    "type": "object",
    "required": ["rid"],
    "properties": {"rid": {"type": "string", "description": "the request id to abort"}},
}
NODE_DOC = openapi_document(
    "pdserve node",
    "1",
    [
        *generation_operations(),
        Operation("/v1/models", "get", "the served model"),
        Operation("/health", "get", "200 once loaded, 503 while loading or draining"),
        Operation("/health_generate", "get", "200 when a one-token generation succeeds"),
        Operation("/get_model_info", "get", "the model's path and sizes"),
        Operation("/get_server_info", "get", "the engine's settings and load"),
        Operation("/flush_cache", "post", "drop the prefix cache (refused while requests run)"),
        Operation("/flush_cache", "get", "drop the prefix cache (refused while requests run)"),
        Operation("/check_integrity", "get", "the KV pages' invariants"),
        Operation("/metrics", "get", "Prometheus metrics", answers="text/plain"),
        Operation("/abort_request", "post", "abort a request by rid", "AbortRequest"),
        *tokenize_operations(),
        Operation("/openapi.json", "get", "this document"),
        Operation("/docs", "get", "this document in Swagger UI", answers="text/html"),
    ],
    {"AbortRequest": ABORT_SCHEMA},
)


def create_node_app(ctx: NodeContext) -> Starlette:
    routes = NodeRoutes(ctx)
    admin = NodeAdmin(ctx)
    tokenizing = Tokenizing(ctx)
    generation = {
        "/generate": generation_route(routes.generate, ctx, "generate"),
        "/v1/completions": generation_route(routes.completions, ctx, "completions"),
        "/v1/chat/completions": generation_route(routes.chat, ctx, "chat_completions"),
    }
    table = [
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in generation.items()),
        Route("/v1/models", admin.models, methods=["GET"]),
        Route("/health", admin.health, methods=["GET"]),
        Route("/health_generate", admin.health_generate, methods=["GET"]),
        Route("/get_model_info", admin.model_info, methods=["GET"]),
        Route("/get_server_info", admin.server_info, methods=["GET"]),
        Route("/flush_cache", admin.flush_cache, methods=["POST", "GET"]),
        Route("/check_integrity", admin.check_integrity, methods=["GET"]),
        Route("/metrics", admin.metrics, methods=["GET"]),
        Route("/abort_request", admin.abort_request, methods=["POST"]),
        Route("/tokenize", tokenizing.tokenize, methods=["POST"]),
        Route("/detokenize", tokenizing.detokenize, methods=["POST"]),
        Route("/version", version, methods=["GET"]),
        Route("/openapi.json", openapi_json(NODE_DOC), methods=["GET"]),
        Route("/docs", docs(NODE_DOC), methods=["GET"]),
    ]
    served = ", ".join(route.path for route in table)
    return Starlette(routes=table, exception_handlers={HTTPException: openai_http_errors(served)})
