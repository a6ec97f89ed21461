"""Server-sent events as OpenAI and SGLang stream them: `data: <json>\\n\\n`, ending in `[DONE]`.

`encode_event` / `error_event` / `DONE` write a stream; `SSEDecoder` reads one back, event by
event, from chunks cut anywhere (what an HTTP client hands over).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ApiError

DONE = b"data: [DONE]\n\n"
DONE_PAYLOAD = b"[DONE]"
MEDIA_TYPE = "text/event-stream"
# Headers every stream should carry: no caching, and no proxy buffering (nginx honours this).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(payload: Any) -> bytes:
    """Compact JSON, as streams carry it."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def encode_event(payload: Any) -> bytes:
    """One event: `payload` (a JSON-able value, or bytes already encoded) as `data: ...`."""
    data = payload if isinstance(payload, bytes) else dumps(payload)
    return b"data: " + data + b"\n\n"


def error_event(error: ApiError) -> bytes:
    """A mid-stream failure, as an event (send `DONE` after it)."""
    return encode_event(error.body())


def error_in(payload: bytes) -> dict[str, Any] | None:
    """The `error` object of an event payload, or None when the event is not an error."""
    if b'"error"' not in payload:  # NOTE: cheap test first, this runs on every relayed event
        return None
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, dict):
        return error
    return {"message": error} if isinstance(error, str) else None


class SSEDecoder:
    """Splits a byte stream into event payloads (the joined `data:` lines of each event).

    Comments (`: ...`) and other fields (`event:`, `id:`, `retry:`) are dropped. A payload of
    `[DONE]` is returned as `DONE_PAYLOAD`.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        if b"\r" in self._buffer:
            # NOTE: on the whole buffer, so that a CRLF cut between two chunks is caught too
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
        events = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return events
            block, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            payload = _data_of(block)
            if payload is not None:
                events.append(payload)

    @property
    def pending(self) -> bytes:
        """Bytes of an unfinished event (non-empty at the end of a cut-off stream)."""
        return self._buffer


def _data_of(block: bytes) -> bytes | None:
    lines = [line for line in block.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)
