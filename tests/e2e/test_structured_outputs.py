"""Structured outputs through the PD cluster (`pdserve launch`, the gateway, the `openai`
client), over Mooncake: prefill draws the first token under the request's grammar,
decode rebuilds the matcher from the grammar and that token and goes on. With random weights,
every `json_schema` answer validates, streamed or not, over seeds and temperatures; every
`json_object` answer is an object; SGLang's native `regex` matches. A bad schema is a 400
naming the problem, and one over the gateway's size limit never reaches a node. The decode node
splits `<think>...</think>` into `reasoning_content` (an EBNF grammar makes the random model
think), streamed as `delta.reasoning_content`, unless the request says separate_reasoning:
false. Tool calls: a named function or "required" always gives calls whose arguments validate,
streamed (name first, arguments in pieces) or not; "auto" parses the Hermes call an EBNF grammar
makes the model write; bad tool requests are 400s."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.cluster_util import Cluster, cluster_yaml, launched
from tests.test_grammar import SCHEMAS

pytestmark = pytest.mark.slow
pytest.importorskip("xgrammar", reason="constrained decoding needs xgrammar")


# NOTE: one transfer engine: what crosses it here (the first token, in the metadata block) is
# what every PD request sends, which test_pd_cluster runs over each engine
@pytest.fixture(scope="module")
def cluster(make_tiny, tmp_path_factory) -> Cluster:
    config = cluster_yaml(make_tiny("qwen3"), "mooncake", prefill=1, decode=1,
                          max_grammar_bytes=4096)  # fmt: skip
    config["decode"][0]["reasoning_parser"] = "qwen3"
    with launched(config, tmp_path_factory.mktemp("so")) as c:
        yield c


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)


def response_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


def whole_choice(api: openai.OpenAI, body: dict):
    """The first choice of a chat completion not streamed; its raw message says `content`
    (text, or null beside tool calls, as OpenAI's does)."""
    raw = api.chat.completions.with_raw_response.create(**body)
    assert "content" in raw.http_response.json()["choices"][0]["message"]
    return raw.parse().choices[0]


def chat(api: openai.OpenAI, stream: bool, **kw) -> tuple[str, str]:
    """(text, finish_reason) of one chat completion, streamed or not."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Describe a thing"}],
            "max_tokens": 120, **kw}  # fmt: skip
    if not stream:
        choice = whole_choice(api, body)
        return choice.message.content or "", choice.finish_reason
    text, reason = "", None
    for chunk in api.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate(cluster: Cluster, name: str) -> None:
    api = client(cluster)
    for i, (temperature, stream) in enumerate([(0.0, False), (0.7, True), (1.2, False),
                                               (1.2, True)]):  # fmt: skip
        text, reason = chat(api, stream, temperature=temperature, seed=i,
                            response_format=response_format(name))  # fmt: skip
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_answers_are_objects(cluster: Cluster) -> None:
    api = client(cluster)
    for seed in range(3):
        text, reason = chat(api, seed % 2 == 1, temperature=1.0, seed=seed,
                            response_format={"type": "json_object"})  # fmt: skip
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length" and text.startswith("{")


def test_native_regex_matches(cluster: Cluster) -> None:
    pattern = r"[a-c]{3}-[0-9]{2,4}"
    for seed in range(3):
        params = {"max_new_tokens": 40, "temperature": 1.0, "seed": seed, "regex": pattern}
        r = httpx.post(f"{cluster.url}/generate", json={"text": "id:", "sampling_params": params},
                       timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        assert re.fullmatch(pattern, r.json()["text"]), r.json()["text"]


def test_bad_and_oversized_schemas_are_400s(cluster: Cluster) -> None:
    api = client(cluster)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}
    with pytest.raises(openai.BadRequestError, match="invalid json_schema"):
        chat(api, False, response_format=bad)
    huge = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(400)}}
    oversized = {"type": "json_schema", "json_schema": {"name": "x", "schema": huge}}
    with pytest.raises(openai.BadRequestError, match="above this gateway's limit of 4096"):
        chat(api, False, response_format=oversized)
    with pytest.raises(openai.BadRequestError, match=r"response_format\.type must be"):
        chat(api, False, response_format={"type": "xml"})
    text, _ = chat(api, False, max_tokens=3)  # the cluster goes on
    assert text is not None


THINK = 'root ::= "<think>" [a-z ]{3,12} "</think>" [a-z]{2,8}'


def test_reasoning_content_is_apart_from_the_answer(cluster: Cluster) -> None:
    api = client(cluster)
    for seed in range(2):
        kw = {"temperature": 1.0, "seed": seed, "extra_body": {"ebnf": THINK}}
        whole = api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Think first"}], max_tokens=60,
            **kw,
        ).choices[0].message  # fmt: skip
        thought = whole.model_extra["reasoning_content"]
        assert re.fullmatch(r"[a-z ]{3,12}", thought) and re.fullmatch(r"[a-z]{2,8}", whole.content)
        chunks = list(api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Think first"}], max_tokens=60,
            stream=True, **kw,
        ))  # fmt: skip
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        streamed = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        assert (streamed, "".join(d.content or "" for d in deltas)) == (thought, whole.content)
        kw["extra_body"]["separate_reasoning"] = False
        raw = api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Think first"}], max_tokens=60,
            **kw,
        ).choices[0].message  # fmt: skip
        assert raw.content == f"<think>{thought}</think>{whole.content}"


# ---- tool calls ----

FUNCTIONS = {name.replace("-", "_"): schema for name, schema in SCHEMAS.items()}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": s}}
         for n, s in FUNCTIONS.items()]  # fmt: skip
CALL = r'root ::= "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"" ' \
       r'[a-z]{2,8} "\"}}\n</tool_call>"'  # fmt: skip
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip


def tool_calls(api: openai.OpenAI, stream: bool, **kw) -> tuple[list, str, str | None]:
    """([(name, arguments)], finish_reason, content) of one chat completion with tools; a
    stream's deltas must say each call's id and name before its arguments."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Call a tool"}],
            "max_tokens": 160, **kw}  # fmt: skip
    if not stream:
        choice = whole_choice(api, body)
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        assert all(c.id.startswith("call_") for c in choice.message.tool_calls or [])
        return calls, choice.finish_reason, choice.message.content
    calls: list[list] = []
    content, reason = None, None
    for chunk in api.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            content = (content or "") + choice.delta.content if choice.delta.content else content
            reason = choice.finish_reason or reason
            for d in choice.delta.tool_calls or []:
                if d.id is not None:
                    assert d.index == len(calls) and d.function.name, d
                    calls.append([d.function.name, ""])
                calls[d.index][1] += d.function.arguments or ""
    return [tuple(c) for c in calls], reason, content


def test_named_and_required_tool_calls_validate(cluster: Cluster) -> None:
    api = client(cluster)
    cases = [(0.0, False), (0.8, True), (1.2, False), (1.2, True)]
    for i, (temperature, stream) in enumerate(cases):
        name = list(FUNCTIONS)[i % len(FUNCTIONS)]
        forced = {"type": "function", "function": {"name": name}}
        calls, reason, content = tool_calls(api, stream, temperature=temperature, seed=i,
                                            tools=TOOLS, tool_choice=forced)  # fmt: skip
        assert reason == "tool_calls" and not content and [n for n, _ in calls] == [name]
        jsonschema.validate(json.loads(calls[0][1]), FUNCTIONS[name])
        calls, reason, content = tool_calls(api, stream, temperature=temperature, seed=i,
                                            tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False)  # fmt: skip
        assert reason == "tool_calls" and not content and len(calls) == 1, calls
        jsonschema.validate(json.loads(calls[0][1]), FUNCTIONS[calls[0][0]])


def test_auto_tool_calls_are_parsed_from_the_text(cluster: Cluster) -> None:
    """An EBNF grammar makes the random model write a Hermes <tool_call>; the decode node's
    parser (picked by the ChatML template's tools section) returns it as tool_calls."""
    api = client(cluster)
    for seed, stream in [(0, False), (1, True)]:
        calls, reason, content = tool_calls(api, stream, temperature=1.0, seed=seed,
                                            tools=[WEATHER_TOOL], extra_body={"ebnf": CALL})  # fmt: skip
        assert reason == "tool_calls" and not content and [n for n, _ in calls] == ["get_weather"]
        assert re.fullmatch(r"[a-z]{2,8}", json.loads(calls[0][1])["city"])
    text, reason = chat(api, False, temperature=1.0, seed=0, tools=[WEATHER_TOOL],
                        tool_choice="none", extra_body={"ebnf": CALL})  # fmt: skip
    assert reason == "stop" and text.startswith("<tool_call>")  # "none": the text as it is


def test_bad_tool_requests_are_400s(cluster: Cluster) -> None:
    api = client(cluster)
    unknown = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(openai.BadRequestError, match="'nope', not among the tools"):
        tool_calls(api, False, tools=TOOLS, tool_choice=unknown)
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        tool_calls(api, False, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="drop response_format"):
        tool_calls(api, False, tools=TOOLS, tool_choice="required",
                   response_format={"type": "json_object"})  # fmt: skip
