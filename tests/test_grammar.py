"""Constrained decoding (engine/grammar.py, xgrammar) through the engine: with random weights,
every output of a JSON schema validates against it, over seeds and temperatures, greedy and
sampled, beside free requests in the same steps (which get what they get alone); json_object
always parses as an object; a regex's output matches it; a finished grammar ends the request
with "stop"; a bad grammar is refused naming the problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams

pytest.importorskip("xgrammar", reason="constrained decoding needs xgrammar")

SCHEMAS = {
    "enum-and-bounded-int": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["color", "count"],
        "additionalProperties": False,
    },
    "nested-array-optional": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 6},
                               "admin": {"type": "boolean"}},
                "required": ["name"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "any-of": {
        "anyOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
             "additionalProperties": False},
            {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"],
             "additionalProperties": False},
        ]
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def llm(make_tiny) -> LLM:
    return LLM(str(make_tiny("qwen3")), dtype="float32", max_total_tokens=8192)


def constrained(kind: str, source: str, temperature: float, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=temperature, seed=seed, max_tokens=120, grammar=(kind, source)
    )


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_validates_against_its_schema(llm: LLM, name: str) -> None:
    schema = SCHEMAS[name]
    params = [constrained("json_schema", json.dumps(schema), t, s)
              for t in (0.0, 0.7, 1.3) for s in range(4)]  # fmt: skip
    free = SamplingParams(temperature=0.9, seed=1, max_tokens=30)
    outs = llm.generate(["Describe it", *["Say something"] * len(params)], [free, *params])
    assert outs[0].finish_reason == "length"  # the free request rode along, unconstrained
    for out in outs[1:]:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_always_parses_as_an_object(llm: LLM) -> None:
    params = [constrained("json_object", "", t, s) for t in (0.5, 1.0) for s in range(4)]
    for out in llm.generate(["{"] * len(params), params):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:  # cut by max_tokens mid-object: still a prefix of one
            assert out.finish_reason == "length" and out.text.startswith("{")


def test_regex_and_ebnf_outputs_match(llm: LLM) -> None:
    pattern = r"[a-c]{3}-[0-9]{2,4}"
    ebnf = 'root ::= "yes" | "no" | "maybe " [0-9]'
    for seed in range(4):
        out = llm.generate("code:", constrained("regex", pattern, 1.0, seed))[0]
        assert re.fullmatch(pattern, out.text) and out.finish_reason == "stop", out.text
        out = llm.generate("answer:", constrained("ebnf", ebnf, 1.0, seed))[0]
        assert re.fullmatch(r"yes|no|maybe [0-9]", out.text), out.text


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        (("json_schema", '{"type": "objec"}'), "invalid json_schema"),
        (("json_schema", "{not json"), "not valid JSON"),
        (("regex", "[a-"), "invalid regex"),
        (("yaml", "x"), "unknown grammar kind 'yaml'"),
    ],
)
def test_bad_grammars_are_refused_naming_the_problem(llm: LLM, grammar, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate("x", SamplingParams(grammar=grammar))
    assert llm.generate("x", SamplingParams(max_tokens=2))[0].token_ids  # the engine goes on


def test_compiled_grammars_are_cached(llm: LLM, tmp_path: Path) -> None:
    source = json.dumps(SCHEMAS["any-of"])
    first = llm.engine.grammars.compiled("json_schema", source)
    assert llm.engine.grammars.compiled("json_schema", source) is first


def test_mixed_batches_give_each_request_what_it_gets_alone(llm: LLM) -> None:
    """A constrained request and free ones in the same steps: the mask touches only its row."""
    schema = constrained("json_schema", json.dumps(SCHEMAS["nested-array-optional"]), 0.0, 0)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)
    prompts = ["Describe it", "Say something", "A third one"]
    params = [greedy, schema, seeded]
    together = llm.generate(prompts, params)
    alone = [llm.generate(p, q)[0] for p, q in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert together[1].finish_reason == "stop" and json.loads(together[1].text)


def test_greedy_masked_argmax_equals_masking_the_logits(llm: LLM, monkeypatch) -> None:
    """Where the CPU LM head takes the grammar's bitmask (int8 pass), greedy constrained rows
    skip the logits; they pick what masking the logits picks."""
    runner = llm.engine.runner
    if not runner._masked_argmax():
        pytest.skip("this CPU's LM head has no int8 pass (no AVX512-VNNI): logits only")
    params = [constrained("json_schema", json.dumps(schema), 0.0, 0) for schema in SCHEMAS.values()]
    prompts = ["Describe it", "Say something", "A third one"]
    calls = []
    original = runner.lm_head_kernel.argmax
    monkeypatch.setattr(runner.lm_head_kernel, "argmax",
                        lambda x, allowed=None: calls.append(allowed) or original(x, allowed))  # fmt: skip
    masked = [o.token_ids for o in llm.generate(prompts, params)]
    assert any(a is not None for a in calls)  # the bitmask went to the LM head
    monkeypatch.setattr(runner, "_masked_argmax", lambda: False)
    assert [o.token_ids for o in llm.generate(prompts, params)] == masked
