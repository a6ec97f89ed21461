"""One benchmark request: the payload each backend sends, the stream read, the timings taken.

TTFT is taken at the first chunk that carries text, each later chunk adds one inter-token
latency (the native stream reports its token count, so a chunk of k tokens adds k equal ITLs),
the way SGLang's bench_serving times them. A failure of any kind (refused connection, a 4xx, an
error event mid-stream) ends as an unsuccessful `RequestOutput` with the reason, never a raise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from .datasets import DatasetRow

# --backend -> the API it speaks; native: SGLang's /generate, the others OpenAI's
BACKENDS = {
    "sglang": "native",
    "sglang-native": "native",
    "sglang-oai": "completions",
    "sglang-oai-chat": "chat",
    "vllm": "completions",
    "vllm-chat": "chat",
}
ROUTES = {"native": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
DEFAULT_PORTS = {"vllm": 8000, "vllm-chat": 8000}  # the others: SGLang's 30000


@dataclass(frozen=True)
class Endpoint:
    """Where and how every request of a run is sent."""

    api: str  # native | completions | chat
    url: str  # the full route, e.g. http://127.0.0.1:30000/generate
    model: str
    stream: bool = True
    ignore_eos: bool = True
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestOutput:
    success: bool
    prompt_len: int
    generated_text: str = ""
    output_len: int | None = None  # the server's count (usage / meta_info); None: it sent none
    start_time: float = 0.0  # time.perf_counter() when sent
    latency: float = 0.0  # seconds, send to the end of the response
    ttft: float = 0.0
    itl: tuple[float, ...] = ()
    error: str = ""
    planned_output_len: int = 0  # what the dataset asked for
    server_prompt_len: int | None = None  # the server's prompt_tokens; None: it sent none


@dataclass(frozen=True)
class Piece:
    """What one parsed chunk says: text, and the server's token counts when it gives them."""

    text: str = ""
    has_content: bool = False
    total_tokens: int | None = None  # tokens generated so far (native); None: one per chunk
    usage: int | None = None  # completion_tokens, when the chunk reports them
    prompt_tokens: int | None = None  # the server's prompt count, when the chunk reports it


class StreamError(RuntimeError):
    """The server reported an error inside the response."""


class Timeline:
    """Arrival times of one response's chunks."""

    def __init__(self, start: float) -> None:
        self.start = self.last = start
        self.ttft: float | None = None
        self.itl: list[float] = []
        self.text = ""
        self.tokens = 0
        self.output_len: int | None = None
        self.prompt_len: int | None = None

    def add(self, now: float, piece: Piece) -> None:
        if piece.usage is not None:
            self.output_len = piece.usage
        if piece.prompt_tokens is not None:
            self.prompt_len = piece.prompt_tokens
        if not piece.has_content:
            return
        new = 1 if piece.total_tokens is None else piece.total_tokens - self.tokens
        if self.ttft is None:
            self.ttft = now - self.start
        elif new <= 0:
            return  # NOTE: SGLang skips chunks that add no token (and keeps the last timestamp)
        else:
            self.itl.extend([(now - self.last) / new] * new)
        self.last, self.tokens = now, self.tokens + max(new, 0)
        self.text += piece.text

    def output(self, row: DatasetRow, end: float) -> RequestOutput:
        latency = end - self.start
        return RequestOutput(
            success=True,
            prompt_len=row.prompt_len,
            generated_text=self.text,
            output_len=self.output_len,
            planned_output_len=row.output_len,
            server_prompt_len=self.prompt_len,
            start_time=self.start,
            latency=latency,
            ttft=latency if self.ttft is None else self.ttft,
            itl=tuple(self.itl),
        )


def payload(endpoint: Endpoint, prompt: str | list[int], output_len: int) -> dict[str, Any]:
    if endpoint.api == "native":
        body: dict[str, Any] = {
            "input_ids" if isinstance(prompt, list) else "text": prompt,
            "sampling_params": {
                "temperature": 0.0,
                "max_new_tokens": output_len,
                "ignore_eos": endpoint.ignore_eos,
            },
        }
    else:
        key, value = ("prompt", prompt)
        if endpoint.api == "chat":
            key, value = "messages", [{"role": "user", "content": prompt}]
        body = {"model": endpoint.model, key: value, "temperature": 0.0}
        body.update(max_tokens=output_len, ignore_eos=endpoint.ignore_eos)
        if endpoint.stream:
            body["stream_options"] = {"include_usage": True}
    return {**body, "stream": endpoint.stream, **endpoint.extra_body}


def counts(info: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(completion_tokens, prompt_tokens) of a `usage` or native `meta_info` object."""
    info = info or {}
    return info.get("completion_tokens"), info.get("prompt_tokens")


def native_piece(data: dict[str, Any], timeline: Timeline) -> Piece:
    text = data.get("text") or ""
    tokens, prompt = counts(data.get("meta_info"))
    return Piece(text[len(timeline.text) :], bool(text), tokens, tokens, prompt)


def completions_piece(data: dict[str, Any], _timeline: Timeline) -> Piece:
    choices = data.get("choices") or [{}]
    text = choices[0].get("text") or ""
    return Piece(text, bool(text), None, *counts(data.get("usage")))


def chat_piece(data: dict[str, Any], _timeline: Timeline) -> Piece:
    choices = data.get("choices") or [{}]
    text = (choices[0].get("delta") or {}).get("content") or ""
    return Piece(text, bool(text), None, *counts(data.get("usage")))


PARSERS: dict[str, Callable[[dict[str, Any], Timeline], Piece]] = {
    "native": native_piece,
    "completions": completions_piece,
    "chat": chat_piece,
}


def whole_piece(api: str, data: dict[str, Any]) -> Piece:
    """A non-streamed response, read as one chunk."""
    if api == "native":
        return Piece(data.get("text") or "", True, None, *counts(data.get("meta_info")))
    choice = (data.get("choices") or [{}])[0]
    if api == "completions":
        text = choice.get("text")
    else:
        text = (choice.get("message") or {}).get("content")
    return Piece(text or "", True, None, *counts(data.get("usage")))


async def send(
    client: httpx.AsyncClient, endpoint: Endpoint, row: DatasetRow, max_tokens: int | None = None
) -> RequestOutput:
    """Send one request and time it; every failure comes back as success=False with the reason."""
    prompt_len = row.prompt_len
    start = time.perf_counter()
    body = payload(endpoint, row.prompt, row.output_len if max_tokens is None else max_tokens)
    try:
        async with client.stream("POST", endpoint.url, json=body, headers=endpoint.headers) as r:
            if r.status_code != 200:
                return failed(prompt_len, start, f"HTTP {r.status_code}: {await error_text(r)}")
            timeline = Timeline(start)
            if endpoint.stream:
                await read_stream(r, endpoint.api, timeline)
            else:
                data = json.loads(await r.aread())
                timeline.add(time.perf_counter(), whole_piece(endpoint.api, data))
            return timeline.output(row, time.perf_counter())
    except Exception as exc:  # NOTE: a benchmark counts failures; it never dies of one request
        return failed(prompt_len, start, f"{type(exc).__name__}: {exc}")


async def read_stream(response: httpx.Response, api: str, timeline: Timeline) -> None:
    parse = PARSERS[api]
    async for raw in response.aiter_lines():
        line = raw.strip()
        if not line or line.startswith(":"):
            continue
        chunk = line.removeprefix("data:").strip()
        if chunk == "[DONE]":
            continue
        data = json.loads(chunk)
        if isinstance(data, dict) and data.get("error"):
            raise StreamError(error_message(data))
        timeline.add(time.perf_counter(), parse(data, timeline))


async def error_text(response: httpx.Response) -> str:
    raw = (await response.aread()).decode("utf-8", errors="replace")
    try:
        return error_message(json.loads(raw))
    except ValueError:
        return raw.strip()[:500] or response.reason_phrase


def error_message(data: Any) -> str:
    """The message of an OpenAI-shaped error body, else the body."""
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return json.dumps(error)[:500]


def failed(prompt_len: int, start: float, reason: str) -> RequestOutput:
    return RequestOutput(False, prompt_len, start_time=start, error=reason)
