"""From an HTTP body (OpenAI or SGLang native) to the node's tokenized jobs.

A job is one prompt and one sample: a completions request with 2 prompts and n=3 makes 6 jobs,
indexed prompt * n + sample (OpenAI's choice order). Sampling options become SamplingParams
fields by name; the scheduler validates them and answers 400 for bad values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from api.errors import invalid_request
from api.openai import ChatCompletionRequest, CompletionRequest
from api.resume import RESUME_IDS, resume_ids
from node.messages import GenerateRequest

# Extra sampling fields clients may send beside OpenAI's (SGLang / vLLM extensions).
EXTRA_PARAMS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)
# SGLang's /generate sampling_params names that differ from ours.
NATIVE_RENAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "no_stop_trim": "include_stop_str_in_output",
}
NATIVE_IGNORED = ("spaces_between_special_tokens", "n", "sampling_seed")


@dataclass(frozen=True)
class Job:
    index: int  # choice index
    prompt_index: int
    request: GenerateRequest


def job_rid(base: str, index: int, total: int) -> str:
    return base if total == 1 else f"{base}-{index}"


def is_job_of(rid: str, base: str) -> bool:
    """Whether `rid` is job "<base>-<i>" of request `base` (another request's "<base>-retry1" or
    "<base>-x" is not: aborting `base` must not abort it)."""
    index = rid.removeprefix(f"{base}-")
    return index != rid and index.isdigit()


def bootstrap_of(body: dict[str, Any], index: int, total: int) -> dict[str, Any]:
    """bootstrap_host/port/room for job `index` of `total`: scalars, or lists with one item per
    job in prompt-major order (sample i of prompt p at p * n + i), as SGLang's router sends."""
    fields = {}
    for key in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
        value = body.get(key)
        if isinstance(value, list):
            if len(value) != total:
                raise invalid_request(
                    f"{key} has {len(value)} items for {total} prompts x samples "
                    "(send one per prompt and sample)",
                    param=key,
                )
            value = value[index]
        fields[key] = value
    if fields["bootstrap_room"] is not None and None in fields.values():
        raise invalid_request("PD requests need bootstrap_host, bootstrap_port and bootstrap_room")
    return fields


def make_jobs(
    rid: str,
    prompts: Sequence[list[int]],
    params: dict[str, Any],
    n: int,
    body: dict[str, Any],
) -> list[Job]:
    total = len(prompts) * n
    room = body.get("bootstrap_room")
    if room is not None and not isinstance(room, list) and total > 1:
        raise invalid_request(
            f"{total} prompts x samples need {total} bootstrap rooms (send bootstrap_room as a list)",
            param="bootstrap_room",
        )
    resume = resume_ids(body)
    if resume and total > 1:
        raise invalid_request(f"{RESUME_IDS} goes with one prompt and n=1", param=RESUME_IDS)
    jobs = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            sample = dict(params)
            if n > 1 and sample.get("seed") is not None:
                sample["seed"] = sample["seed"] + i  # n different samples, still reproducible
            index = p * n + i
            boot = bootstrap_of(body, index, total)
            ids, rid_i = [*prompt, *resume], job_rid(rid, index, total)
            req = GenerateRequest(rid_i, ids, sample, num_resumed=len(resume), **boot)
            jobs.append(Job(index, p, req))
    return jobs


def openai_params(req: Any, max_tokens: int, logprobs: int | None) -> dict[str, Any]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "stop": stop,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "logprobs": logprobs,
    }
    extra = req.model_extra or {}
    params.update({k: extra[k] for k in EXTRA_PARAMS if k in extra})
    grammar = openai_grammar(extra)
    if grammar is not None:
        params["grammar"] = grammar
    return params


GRAMMAR_KEYS = ("json_schema", "regex", "ebnf")  # SGLang's, beside OpenAI's response_format


def openai_grammar(extra: dict[str, Any]) -> list[str] | None:
    """The (kind, source) grammar of OpenAI's `response_format` or SGLang's `json_schema`,
    `regex`, `ebnf` fields; None for free text; a 400 for a malformed one."""
    found = [grammar_field(k, extra[k]) for k in GRAMMAR_KEYS if extra.get(k) is not None]
    fmt = extra.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise invalid_request("response_format must be an object", param="response_format")
        kind = fmt.get("type")
        if kind == "json_object":
            found.append(["json_object", ""])
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
                raise invalid_request(
                    "response_format json_schema needs json_schema.schema (a JSON Schema object)",
                    param="response_format.json_schema.schema",
                )
            found.append(["json_schema", json.dumps(spec["schema"])])
        elif kind != "text":
            raise invalid_request(
                f"response_format.type must be text, json_object or json_schema (got {kind!r})",
                param="response_format.type",
            )
    if len(found) > 1:
        raise invalid_request(
            "give one constraint: response_format, json_schema, regex or ebnf", param="regex"
        )
    return found[0] if found else None


def grammar_field(key: str, value: Any) -> list[str]:
    """SGLang's json_schema (a string or an object), regex or ebnf (strings)."""
    if key == "json_schema" and isinstance(value, dict):
        return [key, json.dumps(value)]
    if not isinstance(value, str) or not value:
        raise invalid_request(f"{key} must be a non-empty string", param=key)
    return [key, value]


def completion_prompts(
    req: CompletionRequest, encode: Callable[[str], list[int]]
) -> list[list[int]]:
    """Token ids of each prompt; a 400 for one that tokenizes to nothing (a "" without a BOS)."""
    prompts = [encode(p) if isinstance(p, str) else list(p) for p in req.prompts]
    if any(not p for p in prompts):
        raise invalid_request(
            "prompt is empty once tokenized (send at least one token)", param="prompt"
        )
    return prompts


def completion_max_tokens(req: CompletionRequest) -> int:
    return 16 if req.max_tokens is None else req.max_tokens


def chat_max_tokens(req: ChatCompletionRequest, prompt_len: int, max_model_len: int) -> int:
    limit = req.output_limit
    return max(max_model_len - prompt_len, 1) if limit is None else limit


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


def native_params(body: dict[str, Any]) -> dict[str, Any]:
    raw = body.get("sampling_params") or {}
    if not isinstance(raw, dict):
        raise invalid_request("sampling_params must be an object", param="sampling_params")
    params: dict[str, Any] = {"max_tokens": 128}
    grammars = []
    for key, value in raw.items():
        if key in NATIVE_IGNORED or (key in GRAMMAR_KEYS and value is None):
            continue
        if key in GRAMMAR_KEYS:
            grammars.append(grammar_field(key, value))
            continue
        params[NATIVE_RENAMES.get(key, key)] = value
    if len(grammars) > 1:
        raise invalid_request("give one of json_schema, regex or ebnf", param="sampling_params")
    if grammars:
        params["grammar"] = grammars[0]
    if body.get("return_logprob"):
        params["logprobs"] = int(body.get("top_logprobs_num") or 0)
    return params


def native_prompts(body: dict[str, Any], encode: Callable[[str], list[int]]) -> tuple[list, bool]:
    """(token-id prompts, whether the input was a batch)."""
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise invalid_request("send exactly one of text or input_ids", param="text")
    if text is not None:
        batch = isinstance(text, list)
        texts = text if batch else [text]
        if not all(isinstance(t, str) for t in texts):
            raise invalid_request("text must be a string or a list of strings", param="text")
        prompts = [encode(t) for t in texts]
    else:
        batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        rows = ids if batch else [ids]
        if not all(isinstance(r, list) and all(type(t) is int for t in r) for r in rows):
            raise invalid_request(
                "input_ids must be a list of token ids, or a list of such lists",
                param="input_ids",
            )
        prompts = [list(p) for p in rows]
    if not prompts or any(not p for p in prompts):
        raise invalid_request("prompt is empty (send a non-empty text or input_ids)", param="text")
    return prompts, batch
