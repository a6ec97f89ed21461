"""`EventSplitter`: plain `data: <line>` events relayed byte for byte, every other form exactly as
`api.sse`'s `SSEDecoder` + `encode_event` would relay it, wherever the stream is cut."""

from __future__ import annotations

import random

import pytest

from api.sse import DONE, DONE_PAYLOAD, SSEDecoder, encode_event, error_in
from gateway.events import NO_EVENTS, Events, EventSplitter, is_plain

PLAIN = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: {"c":[3,"x y"]}\n\n'


def payloads_of(stream: bytes) -> tuple[list[bytes], bool]:
    """What a client reads from `stream`: its payloads up to `[DONE]`, and whether that came."""
    payloads = SSEDecoder().feed(stream)
    done = DONE_PAYLOAD in payloads
    if done:
        payloads = payloads[: payloads.index(DONE_PAYLOAD)]
    return payloads, done


def reference(stream: bytes) -> tuple[bytes, bool]:
    """`SSEDecoder` + `encode_event` (a payload of several lines as that many `data:` lines)."""
    payloads, done = payloads_of(stream)
    encoded = [b"data: " + p.replace(b"\n", b"\ndata: ") + b"\n\n" for p in payloads]
    assert [e for p, e in zip(payloads, encoded) if b"\n" not in p] == [
        encode_event(p) for p in payloads if b"\n" not in p
    ]
    return b"".join(encoded), done


def relay(pieces: list[bytes]) -> tuple[bytes, bool, list[Events]]:
    splitter = EventSplitter()
    events = [splitter.feed(piece) for piece in pieces]
    done_at = next((i for i, e in enumerate(events) if e.done), len(events))
    data = b"".join(e.data for e in events[: done_at + 1])  # nothing after [DONE] counts
    return data, done_at < len(events), events


def every_two_way_cut(stream: bytes) -> list[list[bytes]]:
    return [[stream[:i], stream[i:]] for i in range(len(stream) + 1)]


# --- the fast path ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_done", [False, True])
def test_plain_events_relay_byte_for_byte_at_every_cut(with_done: bool) -> None:
    stream = PLAIN + DONE if with_done else PLAIN
    for pieces in every_two_way_cut(stream):
        data, done, events = relay(pieces)
        assert data == PLAIN, pieces
        assert done == with_done, pieces
        with_data = [e for e in events if e.data]
        assert with_data[0].first == b'{"a":1}', pieces
        assert with_data[-1].last == b'{"c":[3,"x y"]}', pieces
        for e in with_data:  # each run holds whole events, first and last named right
            assert e.data.startswith(b"data: " + e.first + b"\n\n")  # type: ignore[operator]
            assert e.data.endswith(b"data: " + e.last + b"\n\n")  # type: ignore[operator]


def test_plain_run_is_passed_on_as_received() -> None:
    events = EventSplitter().feed(PLAIN)
    assert events.data is PLAIN  # no copy, no re-encoding
    assert (events.first, events.last, events.done) == (b'{"a":1}', b'{"c":[3,"x y"]}', False)


def test_partial_event_waits_for_its_end() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a"') is NO_EVENTS
    assert not NO_EVENTS.any
    events = splitter.feed(b':1}\n\ndata: {"b"')
    assert (events.data, events.first, events.last) == (
        b'data: {"a":1}\n\n',
        b'{"a":1}',
        b'{"a":1}',
    )
    assert splitter.feed(b":2}\n\n").data == b'data: {"b":2}\n\n'


def test_done_alone_and_after_events() -> None:
    assert EventSplitter().feed(DONE) == Events(done=True)
    assert Events(done=True).any
    events = EventSplitter().feed(b"data: 1\n\n" + DONE + b"data: after\n\n")
    assert (events.data, events.first, events.last, events.done) == (
        b"data: 1\n\n",
        b"1",
        b"1",
        True,
    )


@pytest.mark.parametrize(
    ("blocks", "plain"),
    [
        (b"data: x\n\n", True),
        (b"data: \n\n", True),
        (b"data: x\n\ndata: y\n\n", True),
        (b"data:x\n\n", False),  # no space: the decoder's job
        (b"data: x\ndata: y\n\n", False),  # two data lines, one event
        (b"event: e\ndata: x\n\n", False),
        (b": keep-alive\n\ndata: x\n\n", False),
        (b"data: x\n\n: comment\n\n", False),
        (b"data: x\n\nid: 1\n\n", False),
        (b"data: x\n\n\ndata: y\n\n", False),  # a stray blank line
    ],
)
def test_is_plain(blocks: bytes, plain: bool) -> None:
    assert is_plain(blocks) is plain


# --- the slow path: same output as SSEDecoder + encode_event -----------------------------------

SLOW_STREAMS = [
    b'data: {"a":\ndata: 1}\n\ndata: {"b":2}\n\n',  # multi-line data
    b': keep-alive\n\ndata: {"a":1}\n\n: another\n\ndata: {"b":2}\n\n',  # comments
    b'event: message\nid: 7\nretry: 100\ndata: {"a":1}\n\nevent: ping\n\ndata: {"b":2}\n\n',
    b'data:{"nospace":1}\n\ndata: {"b":2}\n\n',
    b'data: {"a":1}\r\n\r\ndata: {"b":2}\r\n\r\ndata: [DONE]\r\n\r\n',  # CRLF
    b'data: {"a":1}\n\ndata: {"b":2}\r\n\r\n',  # CRLF turns up later
    b'data: {"a":1}\n\n\ndata: {"b":2}\n\n\n\ndata: [DONE]\n\n',  # stray blank lines
    b'data: {"a":1}\n\n: done soon\n\ndata:[DONE]\n\ndata: {"after":1}\n\n',
    b"data: \n\ndata:\n\n",  # empty payloads
]


@pytest.mark.parametrize("stream", SLOW_STREAMS)
def test_other_forms_match_the_decoder_at_every_cut(stream: bytes) -> None:
    expected, expected_done = reference(stream)
    for pieces in every_two_way_cut(stream):
        data, done, _ = relay(pieces)
        assert (data, done) == (expected, expected_done), pieces
        # a client reads from the relayed events what it would have read from the node's
        assert payloads_of(data + (DONE if done else b"")) == payloads_of(stream), pieces


def test_slow_path_names_first_and_last_payloads() -> None:
    events = EventSplitter().feed(b'event: x\ndata: {"a":\ndata: 1}\n\ndata: 2\n\n')
    assert (events.first, events.last) == (b'{"a":\n1}', b"2")
    # NOTE: one `data:` line per payload line; `data: {"a":\n1}` would lose the `1}` line
    assert events.data == b'data: {"a":\ndata: 1}\n\ndata: 2\n\n'
    assert SSEDecoder().feed(events.data) == [b'{"a":\n1}', b"2"]


def test_random_mixes_cut_at_random_match_the_decoder() -> None:
    forms = [
        lambda i: b'data: {"i":%d}\n\n' % i,
        lambda i: b'data: {"i":%d}\n\n' % i,
        lambda i: b": ping %d\n\n" % i,
        lambda i: b'event: e\ndata: {"i":%d}\n\n' % i,
        lambda i: b'data: {"i":\ndata: %d}\n\n' % i,
        lambda i: b'data:{"i":%d}\n\n' % i,
    ]
    rng = random.Random(1234)
    for _ in range(300):
        stream = b"".join(rng.choice(forms)(i) for i in range(rng.randint(1, 8)))
        if rng.random() < 0.5:
            stream += DONE
        cuts = sorted(rng.sample(range(len(stream) + 1), min(4, len(stream) + 1)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        assert relay(pieces)[:2] == reference(stream), pieces


# --- errors -------------------------------------------------------------------------------------


def test_error_events_stay_detectable_in_relayed_payloads() -> None:
    error = b'{"error":{"message":"boom","type":"internal_error"}}'
    for stream in (
        b'data: {"a":1}\n\ndata: ' + error + b"\n\n" + DONE,
        b'data: {"a":1}\n\nevent: error\ndata: ' + error + b"\n\n" + DONE,
    ):
        for pieces in every_two_way_cut(stream):
            data, done, events = relay(pieces)
            last = [e for e in events if e.data][-1].last
            assert last is not None and error_in(last) == {
                "message": "boom",
                "type": "internal_error",
            }
            assert done and data.endswith(b"data: " + error + b"\n\n")
