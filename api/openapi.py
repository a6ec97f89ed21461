"""The OpenAPI 3.1 document of the routes a server really serves, and its /docs page.

The gateway and the nodes each list their routes as `Operation`s (the path, the method, what it
takes and answers); request bodies come from the pydantic models of api/openai.py (their JSON
schemas, shared under components) or, for SGLang's native /generate, from `GENERATE_SCHEMA`.
Every error answer has OpenAI's error shape. Schema-driven clients and fuzzers (schemathesis)
read `/openapi.json`; `/docs` shows it in Swagger UI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .openai import ChatCompletionRequest, CompletionRequest
from .tokenize import Detokenize, TokenizePrompt

REF = "#/components/schemas/{model}"

SAMPLING_PARAMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "SGLang's sampling parameters (max_new_tokens: default 128, at most the rest of the "
        "context; an explicit value must fit beside the prompt)"
    ),
    "properties": {
        "max_new_tokens": {"type": "integer", "minimum": 1},
        "min_new_tokens": {"type": "integer", "minimum": 0},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer"},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
        "ignore_eos": {"type": "boolean"},
        "skip_special_tokens": {"type": "boolean"},
        "no_stop_trim": {"type": "boolean"},
        "logit_bias": {
            "type": "object",
            "description": "token id -> bias added to its logit",
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
        "seed": {"type": "integer"},
        "n": {"type": "integer", "minimum": 1},
    },
}

GENERATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "SGLang's native generation request: exactly one of text or input_ids",
    "properties": {
        "text": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            ]
        },
        "input_ids": {
            "oneOf": [
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 0},
                        "minItems": 1,
                    },
                },
            ]
        },
        "sampling_params": {"$ref": REF.format(model="SamplingParams")},
        "stream": {"type": "boolean"},
        "rid": {"type": "string"},
        "return_logprob": {"type": "boolean"},
        "top_logprobs_num": {"type": "integer", "minimum": 0, "maximum": 20},
        "logprob_start_len": {"type": "integer", "minimum": -1},
        "return_text_in_logprobs": {"type": "boolean"},
    },
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "OpenAI's error shape",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["integer", "string", "null"]},
            },
        }
    },
}


INSTANCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "an instance of the gateway's pools (POST adds it, DELETE removes it by url)",
    "required": ["url"],
    "properties": {
        "role": {"enum": ["prefill", "decode"]},
        "url": {"type": "string", "description": "http://host:port"},
        "bootstrap_port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535},
    },
}


@dataclass(frozen=True)
class Operation:
    """One method of one path: its summary, request body (a pydantic model, a component
    schema's name, or None) and its success answer's media type."""

    path: str
    method: str
    summary: str
    body: type[BaseModel] | str | None = None
    answers: str = "application/json"  # text/event-stream is added where a body can stream
    streams: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)


def generation_operations() -> list[Operation]:
    """The three generation routes the gateway and the nodes both serve."""
    return [
        Operation("/v1/completions", "post", "OpenAI completions", CompletionRequest,
                  streams=True, tags=("openai",)),
        Operation("/v1/chat/completions", "post", "OpenAI chat completions",
                  ChatCompletionRequest, streams=True, tags=("openai",)),
        Operation("/generate", "post", "SGLang's native generation", "GenerateRequest",
                  streams=True, tags=("native",)),
    ]  # fmt: skip


def tokenize_operations() -> list[Operation]:
    """vLLM's token-counting routes, which the gateway and the nodes both serve."""
    return [
        Operation("/tokenize", "post", "a prompt's (or, with messages, a chat's) token ids",
                  TokenizePrompt, tags=("vllm",)),
        Operation("/detokenize", "post", "token ids back to text", Detokenize, tags=("vllm",)),
        Operation("/version", "get", "the pdserve version", tags=("vllm",)),
    ]  # fmt: skip


def openapi_document(
    title: str,
    version: str,
    operations: list[Operation],
    extra_schemas: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `operations` (`extra_schemas`: components they name)."""
    schemas: dict[str, Any] = {
        "GenerateRequest": GENERATE_SCHEMA,
        "SamplingParams": SAMPLING_PARAMS_SCHEMA,
        "Error": ERROR_SCHEMA,
        **(extra_schemas or {}),
    }
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def with_models(document: dict[str, Any], models: frozenset[str]) -> dict[str, Any]:
    """`document` with the OpenAI requests' `model` limited to the served ids (what the gateway
    accepts; any other is a 404), so clients and fuzzers send ones that reach the nodes. No
    served model known yet: `document` as it is."""
    if not models:
        return document
    schemas = dict(document["components"]["schemas"])
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        if name in schemas:
            schema = {**schemas[name], "properties": dict(schemas[name]["properties"])}
            schema["properties"]["model"] = {"type": "string", "enum": sorted(models)}
            schemas[name] = schema
    return {**document, "components": {**document["components"], "schemas": schemas}}


def _operation(op: Operation, schemas: dict[str, Any]) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}
    answer: dict[str, Any] = {op.answers: {}}
    if op.streams:
        answer["text/event-stream"] = {}
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_') or 'root'}",
        "responses": {
            "200": {"description": "OK", "content": answer},
            "default": {"description": "an error, in OpenAI's shape", "content": error},
        },
    }
    if op.tags:
        out["tags"] = list(op.tags)
    if "{" in op.path:
        name = op.path.split("{", 1)[1].split("}", 1)[0].split(":", 1)[0]
        out["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _body_schema(op.body, schemas)}},
        }
    return out


def _body_schema(body: type[BaseModel] | str, schemas: dict[str, Any]) -> dict[str, Any]:
    if isinstance(body, str):
        return {"$ref": REF.format(model=body)}
    schema = body.model_json_schema(ref_template=REF)
    schemas.update(schema.pop("$defs", {}))
    schemas[body.__name__] = schema
    return {"$ref": REF.format(model=body.__name__)}


def docs_page(title: str) -> str:
    """Swagger UI over this server's /openapi.json (the UI's files load from a CDN)."""
    return f"""<!doctype html>
<html><head><title>{title}</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "/openapi.json", dom_id: "#ui"}});</script>
</body></html>
"""
