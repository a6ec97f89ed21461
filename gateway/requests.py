"""Incoming requests, validated and summarized for routing (`Prepared`).

The client's JSON is forwarded as it came (plus the PD fields): validation here only rejects what
no node would take, applies the gateway's limits, and extracts what the policies look at. A
request for its prompt's logprobs (`echo` with `logprobs`, vLLM's `prompt_logprobs`, /generate's
`logprob_start_len`) is `colocated`: the decode instance prefills it, as only the node that
computes every prompt position has their logits (and it answers the client). With
`max_tokens_limit` set, the body also tells the nodes that limit (`pd_max_tokens_limit`): a
request without max_tokens then gets at most that many tokens, not the rest of the context.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from api.errors import ApiError, invalid_request
from api.openai import (
    MAX_TOKENS_LIMIT,
    ChatCompletionRequest,
    CompletionRequest,
    check_model,
    parse_request,
)

from .limits import PromptCounter
from .policies import RouteKey

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
GENERATE = "/generate"


@dataclass(frozen=True)
class RequestLimits:
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None
    counter: PromptCounter | None = None
    models: frozenset[str] = frozenset()  # served model ids; empty: not known yet, allow any
    max_grammar_bytes: int | None = None
    max_sequences: int | None = None  # prompts x n of one request


@dataclass(frozen=True)
class Prepared:
    route: str
    body: dict[str, Any]
    stream: bool
    key: RouteKey
    # PD fields as lists of this many items (one room per generated sequence, prompt-major:
    # prompt p's sample i is item p * n + i), for batched input or n > 1; None: scalars
    rooms: int | None = None
    colocated: bool = False  # the prompt's logprobs: no prefill instance, the decode prefills


# constraints a node compiles (tools too: "required" and a named function constrain the output)
GRAMMAR_FIELDS = ("response_format", "json_schema", "regex", "ebnf", "tools")


def prepare(route: str, body: dict[str, Any], limits: RequestLimits) -> Prepared:
    """Validate `body` for `route`; raises `ApiError` (400/404) naming what to fix."""
    _check_grammar_size(body, limits)
    if route == COMPLETIONS:
        prepared = _completion(body, limits)
    elif route == CHAT:
        prepared = _chat(body, limits)
    else:
        prepared = _generate(body, limits)
    _check_sequences(prepared.rooms or 1, limits)
    if limits.max_tokens is not None:  # NOTE: the nodes cap an omitted max_tokens with it
        prepared = replace(prepared, body={**prepared.body, MAX_TOKENS_LIMIT: limits.max_tokens})
    return prepared


def _check_sequences(count: int, limits: RequestLimits) -> None:
    if limits.max_sequences is not None and count > limits.max_sequences:
        raise invalid_request(
            f"the request asks for {count} sequences (prompts x n), above this gateway's limit "
            f"of {limits.max_sequences} (split it into smaller requests)",
            param="n",
        )


def _completion(body: dict[str, Any], limits: RequestLimits) -> Prepared:
    req = parse_request(CompletionRequest, body)
    _check_model(req.model, limits)
    _check_max_tokens(req.max_tokens, "max_tokens", limits)
    prompts = req.prompts
    counts = [_prompt_tokens(p, limits, "prompt") for p in prompts]
    # NOTE: a list of token ids is one prompt; a list of strings or of id lists is a batch.
    batched = isinstance(req.prompt, list) and not isinstance(req.prompt[0], int)
    key = _key(_routing_text(prompts[0]), counts, req.max_tokens or 16, req.n)  # OpenAI default: 16
    rooms, colocated = _rooms(len(prompts), req.n, batched), req.prompt_top is not None
    return Prepared(COMPLETIONS, body, req.stream, key, rooms, colocated)


def _chat(body: dict[str, Any], limits: RequestLimits) -> Prepared:
    req = parse_request(ChatCompletionRequest, body)
    _check_model(req.model, limits)
    _check_max_tokens(req.output_limit, req.output_limit_name, limits)
    messages = req.chat_messages()
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    count = None
    if limits.counter is not None:
        count = limits.counter.count_chat(messages, req.template_tools(), req.template_options())
        _check_prompt_length(count, limits, "messages")
    key = _key(text, [count], req.output_limit, req.n)
    rooms, colocated = _rooms(1, req.n, batched=False), req.prompt_top is not None
    return Prepared(CHAT, body, req.stream, key, rooms, colocated)


def _generate(body: dict[str, Any], limits: RequestLimits) -> Prepared:
    inputs = _generate_inputs(body)
    params = body.get("sampling_params")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise invalid_request("sampling_params must be an object", param="sampling_params")
    max_new = params.get("max_new_tokens")
    if max_new is not None and (type(max_new) is not int or max_new < 1):
        raise invalid_request(
            f"max_new_tokens must be an integer >= 1 (ask for at least one token), "
            f"got {max_new!r:.40}",
            param="sampling_params.max_new_tokens",
        )
    _check_max_tokens(max_new, "sampling_params.max_new_tokens", limits)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid_request(f"stream must be true or false (got {stream!r})", param="stream")
    name = "text" if "text" in body else "input_ids"
    counts = [_prompt_tokens(p, limits, name) for p in inputs]
    key = _key(_routing_text(inputs[0]), counts, max_new, 1)
    rooms = _rooms(len(inputs), 1, _is_batch(body))
    return Prepared(GENERATE, body, stream, key, rooms, _input_logprobs(body))


def _input_logprobs(body: dict[str, Any]) -> bool:
    """Whether a /generate body asks for its prompt's logprobs (SGLang: return_logprob with a
    logprob_start_len >= 0; the node checks the values)."""
    start = body.get("logprob_start_len")
    return body.get("return_logprob") is True and type(start) is int and start >= 0


def _generate_inputs(body: dict[str, Any]) -> list[str | list[int]]:
    """The prompts of a /generate body (`text` or `input_ids`, one or a batch)."""
    if ("text" in body) == ("input_ids" in body):
        raise invalid_request("send exactly one of text or input_ids", param="text")
    value = body.get("text", body.get("input_ids"))
    if isinstance(value, str) or _is_ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) or _is_ids(v) for v in value):
        return list(value)
    name = "text" if "text" in body else "input_ids"
    raise invalid_request(
        f"{name} must be a string, a list of token ids, or a non-empty list of those", param=name
    )


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def _rooms(prompts: int, n: int, batched: bool) -> int | None:
    """SGLang router's rule: lists for batched input or n > 1, one item per sequence."""
    return prompts * n if batched or n > 1 else None


def _is_batch(body: dict[str, Any]) -> bool:
    """SGLang's rule: `text` a list, or `input_ids` a list of lists."""
    if isinstance(body.get("text"), list):
        return True
    ids = body.get("input_ids")
    return isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)


def _check_grammar_size(body: dict[str, Any], limits: RequestLimits) -> None:
    """A constraint (OpenAI's response_format, SGLang's json_schema / regex / ebnf, at the top
    or in sampling_params) within the gateway's limit: compiling one costs the node time."""
    if limits.max_grammar_bytes is None:
        return
    params = body.get("sampling_params")
    places = [body, params] if isinstance(params, dict) else [body]
    for place in places:
        for name in GRAMMAR_FIELDS:
            value = place.get(name)
            if value is None:
                continue
            size = len(value if isinstance(value, str) else json.dumps(value))
            if size > limits.max_grammar_bytes:
                raise invalid_request(
                    f"{name} is {size} bytes, above this gateway's limit of "
                    f"{limits.max_grammar_bytes} (send a smaller schema or grammar)",
                    param=name,
                )


def _check_model(model: str, limits: RequestLimits) -> None:
    if limits.models:
        check_model(model, limits.models, "this cluster")


def _check_max_tokens(value: int | None, name: str, limits: RequestLimits) -> None:
    if value is not None and limits.max_tokens is not None and value > limits.max_tokens:
        raise invalid_request(
            f"{name} is {value}, above this gateway's limit of {limits.max_tokens} "
            "(ask for fewer tokens)",
            param=name,
        )


def _prompt_tokens(prompt: str | list[int], limits: RequestLimits, param: str) -> int | None:
    if isinstance(prompt, list):
        count: int | None = len(prompt)
    else:
        count = limits.counter.count_text(prompt) if limits.counter is not None else None
    _check_prompt_length(count, limits, param)
    return count


def _check_prompt_length(count: int | None, limits: RequestLimits, param: str) -> None:
    if count is None or limits.max_prompt_tokens is None or count <= limits.max_prompt_tokens:
        return
    raise ApiError(
        400,
        f"the prompt has {count} tokens, above this gateway's limit of "
        f"{limits.max_prompt_tokens} (shorten the prompt)",
        param=param,
        code="context_length_exceeded",
    )


def _routing_text(prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else ",".join(map(str, prompt))


def _key(text: str, counts: Sequence[int | None], max_tokens: int | None, n: int) -> RouteKey:
    prompt = sum(c if c is not None else len(text) // 4 + 1 for c in counts)
    return RouteKey(text, n * (prompt + (max_tokens or 0)))
