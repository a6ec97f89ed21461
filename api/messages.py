"""Messages between a node's HTTP process and its scheduler process (ZMQ + msgpack).

Each message is a frozen dataclass; on the wire it is `[type tag, field values...]` packed with
msgpack. No pickle: only the registered types decode, and unknown tags are an error.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field, fields
from typing import Any

import msgpack


@dataclass(frozen=True)
class GenerateRequest:
    """A tokenized request. `params` are SamplingParams fields by name."""

    rid: str
    prompt_ids: list[int]
    params: dict[str, Any]
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    @property
    def disaggregated(self) -> bool:
        return self.bootstrap_room is not None


@dataclass(frozen=True)
class AbortRequest:
    rid: str


@dataclass(frozen=True)
class ControlRequest:
    """A call the scheduler answers with a ControlReply of the same call_id."""

    call_id: int
    op: str  # "server_info" | "flush_cache"


@dataclass(frozen=True)
class ControlReply:
    call_id: int
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenOutput:
    """New tokens (a delta) of one request, or its error (`error` set, `status` its HTTP code)."""

    rid: str
    token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)  # [[id, logprob], ...]
    error: str | None = None
    status: int = 200

    @staticmethod
    def failure(rid: str, message: str, status: int = 500) -> TokenOutput:
        return TokenOutput(rid, finished=True, finish_reason="abort", error=message, status=status)

    @staticmethod
    def from_output(out: Any) -> TokenOutput:
        """From an engine RequestOutput (duck-typed: api does not import engine)."""
        return TokenOutput(
            rid=out.rid,
            token_ids=list(out.new_token_ids),
            text_delta=out.text_delta,
            finished=out.finished,
            finish_reason=out.finish_reason,
            matched_stop=out.matched_stop,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            logprobs=list(out.logprobs),
            top_logprobs=[[[t, lp] for t, lp in row] for row in out.top_logprobs],
        )


MESSAGES: dict[str, type] = {
    cls.__name__: cls
    for cls in (GenerateRequest, AbortRequest, ControlRequest, ControlReply, TokenOutput)
}


def encode(msg: Any) -> bytes:
    name = type(msg).__name__
    if name not in MESSAGES:
        raise TypeError(f"{name} is not a node message")
    return msgpack.packb([name, *astuple(msg)], use_bin_type=True)


def decode(data: bytes) -> Any:
    name, *values = msgpack.unpackb(data, raw=False, strict_map_key=False)
    cls = MESSAGES.get(name)
    if cls is None:
        raise ValueError(f"unknown node message type {name!r}")
    if len(values) != len(fields(cls)):
        raise ValueError(f"{name} carries {len(values)} fields, expected {len(fields(cls))}")
    return cls(*values)
