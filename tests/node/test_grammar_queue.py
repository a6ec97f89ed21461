"""A request whose grammar is not compiled yet waits off the scheduler loop (node/
grammar_queue.py) while the loop goes on; it starts once the grammar is ready, answers 400 if
it is not one, and an abort while it waits ends it without a start. A cached grammar starts at
once."""

from __future__ import annotations

import json

import pytest

from engine.engine import Engine
from engine.options import EngineOptions
from node.messages import AbortRequest, GenerateRequest, TokenOutput
from prefill.loop import PrefillLoop
from tests.node.test_prefill_loop import Channel, Sender, run_engine

pytest.importorskip("xgrammar", reason="constrained decoding needs xgrammar")
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture
def loop(make_tiny) -> PrefillLoop:
    options = EngineOptions(dtype="float32", page_size=16, max_total_tokens=4096)
    engine = Engine(str(make_tiny("llama")), options)
    return PrefillLoop(engine, Channel(), Sender())  # type: ignore[arg-type]


def request(rid: str, grammar: list[str]) -> GenerateRequest:
    params = {"max_tokens": 40, "temperature": 0.0, "grammar": grammar}
    return GenerateRequest(rid, list(range(300, 310)), params)


def settle(loop: PrefillLoop) -> None:
    """Wait for every parked grammar, then do what the loop does with them."""
    for _, future in list(loop.compiling.waiting.values()):
        future.exception(timeout=60)
    for req, error in loop.compiling.ready():
        loop.start(req, error)


def outputs(loop: PrefillLoop) -> list[TokenOutput]:
    return [m for m in loop.channel.sent if isinstance(m, TokenOutput)]  # type: ignore[attr-defined]


def test_a_new_grammar_compiles_off_the_loop_then_the_request_runs(loop: PrefillLoop) -> None:
    grammar = ["json_schema", json.dumps(SCHEMA)]
    loop.dispatch(request("a", grammar))
    assert "a" in loop.compiling.waiting and not loop.engine.has_work()  # parked, not started
    settle(loop)
    assert loop.engine.has_work()
    run_engine(loop)
    done = [o for o in outputs(loop) if o.finished]
    assert [o.rid for o in done] == ["a"] and done[0].finish_reason == "stop"
    loop.dispatch(request("b", grammar))  # compiled now: starts at once
    assert not loop.compiling.waiting and loop.engine.has_work()
    run_engine(loop)


def test_a_bad_grammar_is_a_400_and_an_abort_while_waiting_starts_nothing(loop) -> None:
    loop.dispatch(request("bad", ["json_schema", '{"type": "objec"}']))
    loop.dispatch(request("gone", ["regex", "[a-z]{2,5}"]))
    loop.dispatch(AbortRequest("gone"))
    settle(loop)
    sent = outputs(loop)
    failure = next(o for o in sent if o.rid == "bad")
    assert failure.status == 400 and "invalid json_schema" in (failure.error or "")
    assert [o.finish_reason for o in sent if o.rid == "gone"] == ["abort"]
    assert not loop.engine.has_work() and not loop.compiling.waiting
