"""A node's SSE stream cut into runs of whole events, relayed as bytes.

The gateway relays each event as `api.sse.encode_event(payload)` of the payload `SSEDecoder` reads
(`data: <payload>\\n\\n`: comments and other fields dropped, CRLF made LF, a payload of several
lines as that many `data:` lines). Our nodes and SGLang's already send exactly that form, one `data:` line per event, and then the relayed bytes are the
received bytes: `EventSplitter` checks a run of events for that form with a few whole-buffer
searches and passes it on untouched (no per-event decoding or re-encoding). Any other form goes
through `SSEDecoder` and `encode_event`, as before, so the output is the same either way.

    feed(b'data: {"a":1}\\n\\ndata: {"b":2}\\n\\nda') -> Events(data=b'data: {"a":1}\\n\\ndata: {"b":2}\\n\\n',
                                                       first=b'{"a":1}', last=b'{"b":2}')
    feed(b'ta: [DONE]\\n\\n')                         -> Events(done=True)

Token-id comment lines (`:ids 5,17`, api/resume.py) are taken out of the bytes before anything
else and handed over as `Events.ids` (their numbers as sent, parsed only if a stream moves), so
what is relayed is the same as without them.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.resume import IDS_LINE
from api.sse import DONE_PAYLOAD, SSEDecoder, encode_event

DATA = b"data: "
BLOCK_END = b"\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
IDS = b":ids "  # a token-id comment line's start (api/resume.py)


@dataclass(frozen=True)
class Events:
    """Whole events of a stream, up to `[DONE]` (nothing after it is kept)."""

    data: bytes = b""  # the events, encoded as the client gets them (without `[DONE]`)
    first: bytes | None = None  # the first event's payload
    last: bytes | None = None  # the last event's payload
    done: bool = False  # `[DONE]` came
    ids: bytes = b""  # the token ids the events added, as comma-separated digits (`token_ids`)
    untagged: int = 0  # events that came without an ids line (their tokens are not known)
    finished: bool = False  # an ids line said the request finished

    @property
    def any(self) -> bool:
        return bool(self.data) or self.done


NO_EVENTS = Events()


class EventSplitter:
    """Feeds of a byte stream, cut anywhere, in; whole `Events` out."""

    def __init__(self) -> None:
        self._pending = b""
        self._decoder: SSEDecoder | None = None  # once a CR shows up: SSEDecoder from then on

    def feed(self, chunk: bytes) -> Events:
        buffer = self._pending + chunk if self._pending else chunk
        if self._decoder is not None or b"\r" in buffer:
            self._pending = b""
            self._decoder = self._decoder or SSEDecoder()
            return _count_untagged(_decoded_events(self._decoder.feed(buffer)))
        end = buffer.rfind(BLOCK_END)
        if end < 0:
            self._pending = buffer
            return NO_EVENTS
        blocks, self._pending = buffer[: end + 2], buffer[end + 2 :]
        if blocks.startswith(b":ids ") or b"\n:ids " in blocks:
            return _tagged_events(blocks)
        events = _plain_events(blocks) if is_plain(blocks) else _undecoded(blocks)
        return _count_untagged(events)


def is_plain(blocks: bytes) -> bool:
    """Is `blocks` (whole blocks, ending in a blank line) only `data: <one line>\\n\\n` events?

    Every newline must belong to a block's ending pair, and every pair but the last must be
    followed by the next event's `data: `.
    """
    count = blocks.count(BLOCK_END)
    return (
        blocks.startswith(DATA)
        and blocks.count(b"\n") == 2 * count
        and blocks.count(BLOCK_END + DATA) == count - 1
    )


def _tagged_events(blocks: bytes) -> Events:
    """Events whose ids lines are taken out and added up.

    NOTE: the hot path of every stream from our nodes: when each event carries its line first,
    as they send them, a few splits and joins do it (a regex over the whole run cost ~10x)."""
    if blocks.startswith(IDS):
        pieces = blocks[len(IDS) :].split(BLOCK_END + IDS)
        tags, bodies = [], []
        for piece in pieces:
            tag, _, body = piece.partition(b"\n")
            tags.append(tag)
            bodies.append(body)
        rest = b"\n\n".join(bodies)
        if b"\n:ids " in rest:  # NOTE: a tag line elsewhere (not this form): the general way
            return _tagged_by_regex(blocks)
    else:
        return _tagged_by_regex(blocks)
    events = _plain_events(rest) if is_plain(rest) else _undecoded(rest)
    numbers = b",".join(tags)
    finished = b" end" in numbers
    return _with_tags(events, numbers.replace(b" end", b""), len(tags), finished)


def _tagged_by_regex(blocks: bytes) -> Events:
    tags = IDS_LINE.findall(blocks)
    blocks = IDS_LINE.sub(b"", blocks)
    events = _plain_events(blocks) if is_plain(blocks) else _undecoded(blocks)
    ids = b",".join(numbers for numbers, _ in tags)
    return _with_tags(events, ids, len(tags), any(end for _, end in tags))


def token_ids(ids: bytes) -> list[int]:
    """The ids of `Events.ids` (or of several joined with commas)."""
    return [int(t) for t in ids.split(b",") if t]


def _with_tags(events: Events, ids: bytes, tagged: int, finished: bool) -> Events:
    untagged = max(_event_count(events) - tagged, 0)
    return Events(events.data, events.first, events.last, events.done, ids, untagged, finished)


def _count_untagged(events: Events) -> Events:
    count = _event_count(events)
    if not count:
        return events
    return Events(events.data, events.first, events.last, events.done, untagged=count)


def _event_count(events: Events) -> int:
    return events.data.count(BLOCK_END + DATA) + 1 if events.data else 0


def _undecoded(blocks: bytes) -> Events:
    return _decoded_events(SSEDecoder().feed(blocks))


def _plain_events(blocks: bytes) -> Events:
    if blocks.startswith(DONE_EVENT):
        return Events(done=True)
    done_at = blocks.find(BLOCK_END + DONE_EVENT)
    done = done_at >= 0
    data = blocks[: done_at + 2] if done else blocks
    first = data[len(DATA) : data.find(BLOCK_END)]
    last_at = data.rfind(BLOCK_END + DATA, 0, len(data) - 2)
    last = data[last_at + 2 + len(DATA) : -2] if last_at >= 0 else first
    return Events(data, first, last, done)


def _decoded_events(payloads: list[bytes]) -> Events:
    done = DONE_PAYLOAD in payloads
    if done:
        payloads = payloads[: payloads.index(DONE_PAYLOAD)]
    if not payloads:
        return Events(done=done)
    data = b"".join([_encode(p) for p in payloads])
    return Events(data, payloads[0], payloads[-1], done)


def _encode(payload: bytes) -> bytes:
    """`encode_event`, except that a payload of several lines (several `data:` lines joined)
    goes out as several `data:` lines again: one line each would end the field at the first
    newline, and the client would read only that line of it."""
    if b"\n" not in payload:
        return encode_event(payload)
    return b"data: " + payload.replace(b"\n", b"\ndata: ") + b"\n\n"
