"""What a node's answer means (gateway/outcome.py), checked on the pure functions directly."""

from __future__ import annotations

import json

import httpx
import pytest

from api.errors import error_body
from api.sse import DONE, encode_event
from gateway.events import EventSplitter
from gateway.outcome import (
    AttemptFailed,
    Finished,
    Refused,
    cut_mid_stream,
    decode_answer,
    first_events,
    prefill_answer,
    unreachable,
)

URL = "http://d:1"
SSE = "text/event-stream"
TOKEN = encode_event({"text": "hi"})


def event_error(type_: str, code: str | int | None = None) -> bytes:
    body = error_body("boom", type_)
    body["error"]["code"] = code
    return encode_event(body)


def test_decode_whole_answer_is_relayed_as_it_is() -> None:
    got = decode_answer(URL, 200, b'{"x":1}', "application/json; charset=utf-8")
    assert got == Finished(200, b'{"x":1}', "application/json; charset=utf-8")


@pytest.mark.parametrize("status", [400, 404, 413, 429])
def test_a_4xx_is_a_refusal_relayed_with_its_status(status: int) -> None:
    for verdict in (
        decode_answer(URL, status, b"{}", "application/json"),
        prefill_answer(URL, status, b"{}", "application/json"),
    ):
        assert isinstance(verdict, Refused) and verdict.answer == Finished(status, b"{}")


def test_a_5xx_fails_the_instance_naming_it() -> None:
    decode = decode_answer(URL, 503, b"overloaded", "text/plain")
    prefill = prefill_answer("http://p:1", 500, b"x" * 1000, "text/plain")
    assert isinstance(decode, AttemptFailed) and decode.url == URL
    assert decode.error.status == 502 and decode.error.code == "upstream_error"
    assert decode.error.message == f"decode instance {URL} failed: HTTP 503: overloaded"
    assert isinstance(prefill, AttemptFailed) and prefill.url == "http://p:1"
    assert prefill.error.message.startswith("prefill instance http://p:1 failed: HTTP 500: ")
    assert len(prefill.error.message) < 400  # the body is cut short


def test_prefill_that_did_its_part_has_no_verdict() -> None:
    assert prefill_answer(URL, 200, b'{"text": "ok"}', "application/json") is None
    assert prefill_answer(URL, 200, TOKEN + DONE, SSE) is None
    # an "error" that is not an SSE error event is not an error
    assert prefill_answer(URL, 200, b'{"text": "\\"error\\""}', "application/json") is None


def test_an_error_event_is_judged_by_its_type_or_an_integer_4xx_code() -> None:
    refused = prefill_answer(URL, 200, TOKEN + event_error("invalid_request_error") + DONE, SSE)
    assert isinstance(refused, Refused) and refused.answer.status == 400
    assert json.loads(refused.answer.body)["error"]["message"] == "boom"
    # SGLang's nodes say whose fault it is with an integer code: relayed as a string
    foreign = prefill_answer(URL, 200, event_error("BadRequestError", 413) + DONE, SSE)
    assert isinstance(foreign, Refused) and foreign.answer.status == 413
    assert json.loads(foreign.answer.body)["error"]["code"] == "413"
    failed = prefill_answer(URL, 200, event_error("server_error", 500) + DONE, SSE)
    assert isinstance(failed, AttemptFailed) and failed.error.code == "upstream_error"
    assert "its stream carried an error: boom" in failed.error.message
    named = prefill_answer(URL, 200, event_error("server_error", "timeout") + DONE, SSE)
    assert isinstance(named, AttemptFailed) and named.error.code == "timeout"


def test_first_events_of_a_decode_stream() -> None:
    first = EventSplitter().feed(TOKEN)
    assert first_events(URL, first) is first
    empty = first_events(URL, EventSplitter().feed(b""))
    assert isinstance(empty, AttemptFailed)
    assert "ended before the first event" in empty.error.message
    refused = first_events(URL, EventSplitter().feed(event_error("invalid_request_error")))
    assert isinstance(refused, Refused) and refused.answer.status == 400
    failed = first_events(URL, EventSplitter().feed(event_error("server_error") + DONE))
    assert isinstance(failed, AttemptFailed) and failed.url == URL


def test_transport_errors_and_cuts() -> None:
    failed = unreachable("prefill", URL, httpx.ConnectError("refused"))
    assert failed.error.message == f"prefill instance {URL} failed: ConnectError: refused"
    cut = cut_mid_stream(URL, httpx.ReadError("reset"))
    assert cut.status == 502 and cut.code == "upstream_error" and "mid-stream" in cut.message


def test_a_draining_refusal_fails_the_attempt_but_not_the_instance() -> None:
    refusal = json.dumps(error_body("shutting down", "server_error", code="draining")).encode()
    whole = [
        decode_answer(URL, 503, refusal, "application/json"),
        prefill_answer(URL, 503, refusal, "application/json"),
        prefill_answer(URL, 200, event_error("server_error", "draining") + DONE, SSE),
        first_events(URL, EventSplitter().feed(event_error("server_error", "draining"))),
    ]
    for verdict in whole:
        assert isinstance(verdict, AttemptFailed) and verdict.draining, verdict
        assert verdict.url == URL and verdict.error.code == "draining"
    # any other 5xx is the instance's failure, whatever its body says
    others = [
        decode_answer(URL, 503, b"overloaded", "text/plain"),
        decode_answer(URL, 500, refusal, "application/json"),
        prefill_answer(URL, 503, b'{"error": "draining"}', "application/json"),
    ]
    for verdict in others:
        assert isinstance(verdict, AttemptFailed) and not verdict.draining, verdict
