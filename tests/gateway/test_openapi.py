"""/openapi.json describes exactly the routes the gateway and the nodes serve (OpenAPI 3.1, valid
by openapi-spec-validator), with the generation routes' request schemas; /docs serves Swagger UI
over it. Served through the real apps."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.testclient import TestClient

from api.openapi import with_models
from api.settings import GatewaySettings
from gateway.app import GATEWAY_DOC, create_app
from node.app import create_node_app


def served(app: Starlette) -> set[tuple[str, str]]:
    """(path, method) of every route, path parameters as OpenAPI writes them."""
    out = set()
    for route in app.routes:
        path = route.path.replace("{url:path}", "{url}")  # type: ignore[attr-defined]
        out |= {(path, m.lower()) for m in route.methods if m != "HEAD"}  # type: ignore[attr-defined]
    return out


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, ops in doc["paths"].items() for method in ops}


@pytest.fixture(params=["gateway", "node"])
def app(request) -> Starlette:
    if request.param == "gateway":
        return create_app(GatewaySettings())
    return create_node_app(None)  # type: ignore[arg-type]  # only routes are read here


def get(app: Starlette, path: str) -> httpx.Response:
    return TestClient(app).get(path)  # no lifespan: nothing starts but the routes


def test_the_document_is_valid_and_lists_every_served_route(app: Starlette) -> None:
    r = get(app, "/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert documented(doc) == served(app)


def test_generation_routes_carry_their_request_schemas(app: Starlette) -> None:
    doc = (get(app, "/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for path, model in [("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/generate", "GenerateRequest")]:  # fmt: skip
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert "text/event-stream" in op["responses"]["200"]["content"]
    assert {"prompt", "model"} <= set(schemas["CompletionRequest"]["required"])
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1


def test_docs_page_points_swagger_ui_at_the_document(app: Starlette) -> None:
    r = get(app, "/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'url: "/openapi.json"' in r.text


def test_the_gateway_names_its_served_models_once_known() -> None:
    assert with_models(GATEWAY_DOC, frozenset()) is GATEWAY_DOC  # none known yet: as it is
    doc = with_models(GATEWAY_DOC, frozenset({"tiny", "big"}))
    validate(doc)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        model = doc["components"]["schemas"][name]["properties"]["model"]
        assert model == {"type": "string", "enum": ["big", "tiny"]}
        assert "enum" not in GATEWAY_DOC["components"]["schemas"][name]["properties"]["model"]
