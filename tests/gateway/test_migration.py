"""Moving a stream mid-way (gateway/migration.py), with stand-in nodes that cut or hang on demand:
every token reaches the client exactly once however often the stream moves, the new pair is
told every id sent so far, a client leaving mid-move aborts the request on every node involved,
and a stream that cannot move (no moves left) still ends in an error event."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from .conftest import Harness
from .servers import wait_until
from .standin import TOKEN_BASE
from .test_gateway_faults import settled

STREAM = {"model": "tiny", "prompt": "hi", "max_tokens": 6, "stream": True}
EVENTS = 6


def texts(response: httpx.Response) -> tuple[list[str], list[dict]]:
    """(the choices' texts, error objects) of a stream read to its end."""
    got, errors = [], []
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            errors.append(event["error"])
        else:
            got.append(event["choices"][0]["text"])
    return got, errors


def token_order(got: list[str]) -> list[int]:
    return [int(text.split("-t")[1]) for text in got]


def make(harness: Callable[..., Harness], decode: int, **settings) -> Harness:
    h = harness(prefill=1, decode=decode, decode_policy="round_robin", **settings)
    for d in h.decode:
        d.behavior.events = EVENTS
        d.behavior.after = h.prefill
    return h


def test_a_stream_moved_again_and_again_streams_each_token_once(
    harness: Callable[..., Harness],
) -> None:
    h = make(harness, decode=2)
    for d, cut in zip(h.decode, (2, 1)):  # every answer of d0 breaks after 2 events, d1's after 1
        d.behavior.mode, d.behavior.hang_after = "cut", cut
    with h.client() as c, c.stream("POST", "/v1/completions", json=STREAM) as r:
        assert r.status_code == 200
        got, errors = texts(r)
    assert errors == []
    assert token_order(got) == list(range(EVENTS))  # each exactly once, in order
    # each move goes to the other decode node (a 2nd pass on d0 starts where the client is)
    assert [t.split("-")[0] for t in got] == ["d0", "d0", "d1", "d0", "d0", "d1"]
    moves = [b for d in h.decode for b in d.bodies() if "pd_resume_ids" in b]
    by_rid = {b["rid"].rsplit("-", 1)[1]: b["pd_resume_ids"] for b in moves}
    assert by_rid == {
        f"m{k}": [TOKEN_BASE + i for i in range(n)] for k, n in enumerate((2, 3, 5), 1)
    }
    # the prefill node computed each move's prompt too, with the same ids
    in_order = [by_rid[f"m{k}"] for k in (1, 2, 3)]
    assert [b.get("pd_resume_ids") for b in h.prefill[0].bodies()][1:] == in_order
    assert h.gw.metrics.migrations == 3 and h.gw.metrics.stream_errors == 0
    wait_until(lambda: settled(h), what="load accounting back to zero")


def test_a_moved_generate_stream_keeps_every_logprob_its_client_got(
    harness: Callable[..., Harness],
) -> None:
    """/generate events hold every logprob so far: after each move they still do, each entry
    the one its client got from the node that computed it (no gap, no placeholder)."""
    h = make(harness, decode=2)
    for d, cut in zip(h.decode, (2, 1)):
        d.behavior.mode, d.behavior.hang_after = "cut", cut
    body = {"text": "hi", "stream": True, "return_logprob": True}
    with h.client() as c, c.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line) for line in lines if line != "[DONE]"]
    assert all("error" not in e for e in events)
    for event in events:  # every event's logprobs line up with its output ids
        assert [t for _, t, _ in event["meta_info"]["output_token_logprobs"]] == event["output_ids"]
    last = events[-1]["meta_info"]
    assert last["output_token_logprobs"] == [
        [-(k + 1) / 10, TOKEN_BASE + k, node]
        for k, node in enumerate(["d0", "d0", "d1", "d0", "d0", "d1"])
    ]
    assert last["input_token_logprobs"] == [[None, 1, "d0"]]  # the first node's prompt logprobs
    moves = [b for d in h.decode for b in d.bodies("/generate") if "pd_resume_ids" in b]
    assert len(moves) == 3
    for moved in moves:  # each move carried what its client had: one entry per resumed id
        carried = moved["pd_resume_logprobs"]["output_token_logprobs"]
        assert [t for _, t, _ in carried] == moved["pd_resume_ids"]
        assert None not in [lp for lp, _, _ in carried]


def test_moves_are_bounded_then_the_stream_ends_in_an_error(
    harness: Callable[..., Harness],
) -> None:
    h = make(harness, decode=2, max_migrations=1)
    for d in h.decode:
        d.behavior.mode, d.behavior.hang_after = "cut", 1
    with h.client() as c, c.stream("POST", "/v1/completions", json=STREAM) as r:
        got, errors = texts(r)
    assert token_order(got) == [0, 1]
    assert len(errors) == 1 and "mid-stream" in errors[0]["message"]
    assert h.gw.metrics.migrations == 1 and h.gw.metrics.stream_errors == 1


def test_a_silent_stream_moves_after_the_token_timeout(harness: Callable[..., Harness]) -> None:
    h = make(harness, decode=2, token_timeout_s=0.5)
    h.decode[0].behavior.mode, h.decode[0].behavior.hang_after = "hang", 3
    with h.client() as c, c.stream("POST", "/v1/completions", json=STREAM) as r:
        got, errors = texts(r)
    assert errors == [] and token_order(got) == list(range(EVENTS))
    assert h.gw.metrics.migrations == 1
    # the hung node was told to drop its request
    wait_until(lambda: h.decode[0].aborts, what="the hung node gets an abort")


def test_an_instance_taken_out_moves_its_streams_at_once(harness: Callable[..., Harness]) -> None:
    h = make(harness, decode=2, health_interval_s=0.05, health_failures=1)
    h.decode[0].behavior.mode, h.decode[0].behavior.hang_after = "hang", 2
    got: list[str] = []
    with h.client() as c, c.stream("POST", "/v1/completions", json=STREAM) as r:
        lines = r.iter_lines()
        while len(got) < 2:  # the two events before d0 hangs
            line = next(lines)
            if line.startswith("data: "):
                got.append(json.loads(line[6:])["choices"][0]["text"])
        h.decode[0].behavior.healthy = False  # its stream is silent, and now its health too
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                got.append(json.loads(line[6:])["choices"][0]["text"])
    assert token_order(got) == list(range(EVENTS))
    assert h.gw.metrics.migrations == 1


def test_a_client_leaving_during_a_move_aborts_every_node_involved(
    harness: Callable[..., Harness],
) -> None:
    h = make(harness, decode=2)
    h.decode[0].behavior.mode, h.decode[0].behavior.hang_after = "cut", 1
    h.decode[1].behavior.mode, h.decode[1].behavior.hang_after = "hang", 0  # the move waits
    with h.client() as c, c.stream("POST", "/v1/completions", json=STREAM) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        wait_until(lambda: bool(h.decode[1].received), what="the stream moved to d1")
    # the client is gone; the move's request is aborted on its decode and prefill nodes
    (moved,) = h.decode[1].bodies()
    wait_until(lambda: moved["rid"] in h.decode[1].aborts, what="d1 aborts the move")
    wait_until(lambda: moved["rid"] in h.prefill[0].aborts, what="p0 aborts the move")
    wait_until(lambda: settled(h), what="load accounting back to zero")
