"""From an HTTP body (OpenAI or SGLang native) to the node's tokenized jobs.

A job is one prompt and one sample: a completions request with 2 prompts and n=3 makes 6 jobs,
indexed prompt * n + sample (OpenAI's choice order); a prompt's logprobs, when asked, are its
first sample's job's to compute, and every sample of it reports them. Sampling options become
SamplingParams fields by name; the scheduler validates them and answers 400 for bad values.
How many tokens a prompt may generate is `OutputBudget`'s: what the client asked for, when it
fits beside the prompt, else the rest of the context (capped by the route's default and the
gateway's limit).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from api.errors import ApiError, invalid_request
from api.openai import MAX_LOGPROBS, ChatCompletionRequest, CompletionRequest, max_tokens_limit
from api.resume import RESUME_IDS, resume_ids
from node.messages import GenerateRequest

# Extra sampling fields clients may send beside OpenAI's (SGLang / vLLM extensions); null is
# the default.
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
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's, for /v1/completions
NATIVE_DEFAULT_MAX_TOKENS = 128  # SGLang's, for /generate
# SGLang's /generate sampling_params names that differ from ours.
NATIVE_RENAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "no_stop_trim": "include_stop_str_in_output",
}
NATIVE_IGNORED = ("spaces_between_special_tokens", "n", "sampling_seed")
# /generate's boolean sampling_params: strict, so that "maybe" is a 400 naming the field sent
NATIVE_BOOLS = ("ignore_eos", "skip_special_tokens", "no_stop_trim", "include_stop_str_in_output")


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
    max_tokens: Sequence[int],
) -> list[Job]:
    """The request's jobs; `max_tokens` holds each prompt's (`OutputBudget.for_prompts`)."""
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
            sample = {**params, "max_tokens": max_tokens[p]}
            if n > 1 and sample.get("seed") is not None:
                sample["seed"] = sample["seed"] + i  # n different samples, still reproducible
            if i > 0:
                sample.pop("prompt_logprobs", None)  # the same for every sample: computed once
            index = p * n + i
            boot = bootstrap_of(body, index, total)
            ids, rid_i = [*prompt, *resume], job_rid(rid, index, total)
            req = GenerateRequest(rid_i, ids, sample, num_resumed=len(resume), **boot)
            jobs.append(Job(index, p, req))
    return jobs


@dataclass(frozen=True)
class OutputBudget:
    """How many tokens each prompt of a request may generate.

    A prompt that leaves no room for output is a 400 naming the prompt (`prompt_param`). An
    explicit value (`asked`, sent as `param`) must fit beside the prompt in the context, else
    a 400 in vLLM's words; an omitted one is the rest of the context, at most the route's
    `default` (None: no default of its own) and the gateway's `limit` (api/openai.py's
    MAX_TOKENS_LIMIT field), as vLLM caps its default with its configured limits.
    """

    asked: int | None
    param: str
    default: int | None = None
    limit: int | None = None
    prompt_noun: str = "prompt"  # "messages" for a chat, as the error calls the input
    prompt_param: str | None = None  # the input's field, where it is not prompt_noun

    def for_prompts(self, prompts: Sequence[list[int]], max_model_len: int) -> list[int]:
        return [self.for_prompt(len(p), max_model_len) for p in prompts]

    def for_prompt(self, prompt_tokens: int, max_model_len: int) -> int:
        if prompt_tokens >= max_model_len:
            raise self._prompt_too_long(prompt_tokens, max_model_len)
        if self.asked is not None:
            if prompt_tokens + self.asked > max_model_len:
                raise self._too_long(prompt_tokens, max_model_len)
            return self.asked
        rest = max_model_len - prompt_tokens
        return min(v for v in (rest, self.default, self.limit) if v is not None)

    def _prompt_too_long(self, prompt_tokens: int, max_model_len: int) -> ApiError:
        """The prompt alone leaves no room for output: its fault, whatever max_tokens says."""
        noun = self.prompt_noun
        return ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, there "
            f"are {prompt_tokens} tokens in the {noun}, which leaves no room for any output. "
            f"Please reduce the length of the {noun}.",
            param=self.prompt_param or noun,
            code="context_length_exceeded",
        )

    def _too_long(self, prompt_tokens: int, max_model_len: int) -> ApiError:
        assert self.asked is not None
        noun, field = self.prompt_noun, self.param.rpartition(".")[2]
        return ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + self.asked} tokens ({prompt_tokens} in the {noun}, "
            f"{self.asked} in the completion). Please reduce the length of the {noun} or "
            f"{field}.",
            param=self.param,
            code="context_length_exceeded",
        )


def completion_budget(req: CompletionRequest, body: dict[str, Any]) -> OutputBudget:
    limit = max_tokens_limit(body)
    return OutputBudget(req.max_tokens, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, limit)


def chat_budget(req: ChatCompletionRequest, body: dict[str, Any]) -> OutputBudget:
    limit = max_tokens_limit(body)
    return OutputBudget(req.output_limit, req.output_limit_name, None, limit, "messages")


def native_budget(body: dict[str, Any]) -> OutputBudget:
    """/generate's: sampling_params.max_new_tokens (an integer >= 1), default 128."""
    raw = body.get("sampling_params") or {}
    asked = raw.get("max_new_tokens") if isinstance(raw, dict) else None
    param = "sampling_params.max_new_tokens"
    if asked is not None and (type(asked) is not int or asked < 1):
        raise invalid_request(
            f"max_new_tokens must be an integer >= 1 (ask for at least one token), "
            f"got {asked!r:.40}",
            param=param,
        )
    field = "input_ids" if body.get("text") is None else "text"
    limit = max_tokens_limit(body)
    return OutputBudget(asked, param, NATIVE_DEFAULT_MAX_TOKENS, limit, prompt_param=field)


def openai_params(req: Any, logprobs: int | None) -> dict[str, Any]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params: dict[str, Any] = {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "stop": stop,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "logprobs": logprobs,
    }
    if req.prompt_top is not None:
        params["prompt_logprobs"] = req.prompt_top
    if req.logit_bias:
        params["logit_bias"] = req.logit_bias
    # NOTE: the declared extensions (the booleans) and the undeclared ones alike
    params.update(req.model_dump(include=set(EXTRA_PARAMS), exclude_none=True))
    extra = req.model_extra or {}
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


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


def native_params(body: dict[str, Any]) -> dict[str, Any]:
    raw = body.get("sampling_params") or {}
    if not isinstance(raw, dict):
        raise invalid_request("sampling_params must be an object", param="sampling_params")
    params: dict[str, Any] = {}
    grammars = []
    for key, value in raw.items():
        if key in NATIVE_IGNORED or (key in GRAMMAR_KEYS and value is None):
            continue
        if key == "max_new_tokens":
            continue  # native_budget's
        if key in NATIVE_BOOLS and not isinstance(value, bool):
            raise invalid_request(
                f"{key} must be true or false, got {value!r:.40}", param=f"sampling_params.{key}"
            )
        if key == "min_new_tokens" and value is not None and (type(value) is not int or value < 0):
            raise invalid_request(
                f"min_new_tokens must be an integer >= 0, got {value!r:.40}",
                param="sampling_params.min_new_tokens",
            )
        if key in GRAMMAR_KEYS:
            grammars.append(grammar_field(key, value))
            continue
        params[NATIVE_RENAMES.get(key, key)] = value
    if len(grammars) > 1:
        raise invalid_request("give one of json_schema, regex or ebnf", param="sampling_params")
    if grammars:
        params["grammar"] = grammars[0]
    if native_flag(body, "return_logprob"):
        params["logprobs"] = native_top_logprobs(body)
        start = logprob_start(body)
        if start is not None:
            params["prompt_logprobs"] = params["logprobs"]
            params["prompt_logprobs_start"] = start
    return params


def native_top_logprobs(body: dict[str, Any]) -> int:
    """/generate's top_logprobs_num: an integer in [0, 20] (null: 0)."""
    top = body.get("top_logprobs_num")
    if top is not None and (type(top) is not int or not 0 <= top <= MAX_LOGPROBS):
        raise invalid_request(
            f"top_logprobs_num must be an integer in [0, {MAX_LOGPROBS}], got {top!r:.40}",
            param="top_logprobs_num",
        )
    return top or 0


def logprob_start(body: dict[str, Any]) -> int | None:
    """/generate's logprob_start_len with return_logprob: the first prompt position whose
    logprob is reported, or None for none (SGLang's default, -1)."""
    start = body.get("logprob_start_len")
    if start is None or not native_flag(body, "return_logprob"):
        return None
    if type(start) is not int or start < -1:
        raise invalid_request(
            f"logprob_start_len must be an integer >= 0, or -1 for no prompt logprobs "
            f"(got {start!r:.40})",
            param="logprob_start_len",
        )
    return None if start == -1 else start


def check_logprob_start(body: dict[str, Any], prompts: Sequence[list[int]]) -> None:
    """A logprob_start_len past a prompt's end is a 400, in SGLang's words."""
    start = logprob_start(body)
    longer = [len(p) for p in prompts if start is not None and start > len(p)]
    if longer:
        raise invalid_request(
            f"logprob_start_len={start} is higher than the number of input tokens "
            f"{longer[0]}. Please use a smaller logprob_start_len.",
            param="logprob_start_len",
        )


def native_flag(body: dict[str, Any], key: str) -> bool:
    """A /generate boolean (`stream`, `return_logprob`): absent or null is false; anything but
    true or false is a 400, as in the OpenAI routes."""
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise invalid_request(f"{key} must be true or false, got {value!r:.40}", param=key)
    return bool(value)


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
