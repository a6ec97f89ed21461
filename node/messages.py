"""Messages between a node's HTTP process and its scheduler process (ZMQ, transfer's codec).

`TokenOutput` is the node's one output record: the scheduler turns each engine output into one
(the tokens and text a step added), and the HTTP side adds them up into the same shape
(`TokenOutput.add`), from which every response format is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transfer.codec import MessageCodec

if TYPE_CHECKING:
    from engine.engine import RequestOutput
    from engine.prompt_logprobs import PromptLogprobs


@dataclass(frozen=True)
class GenerateRequest:
    """A tokenized request. `params` are SamplingParams fields by name."""

    rid: str
    prompt_ids: list[int]
    params: dict[str, Any]
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    # the last this many prompt_ids are output the request produced on a node that failed
    # (the gateway moved its stream here): see Engine.add_request
    num_resumed: int = 0

    @property
    def disaggregated(self) -> bool:
        return self.bootstrap_room is not None

    @property
    def bootstrap_address(self) -> str:
        """host:port of the prefill node's bootstrap server (PD requests)."""
        return f"{self.bootstrap_host}:{self.bootstrap_port}"


@dataclass(frozen=True)
class AbortRequest:
    rid: str


@dataclass(frozen=True)
class ControlRequest:
    """A call the scheduler answers with a ControlReply of the same call_id."""

    call_id: int
    op: str  # "server_info" | "flush_cache" | "check_integrity"


@dataclass(frozen=True)
class ControlReply:
    call_id: int
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenOutput:
    """Tokens of one request: what one step added, or (added up) everything so far.

    An error ends the request: `error` is the message and `status` its HTTP code.
    """

    rid: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)  # [[id, logprob], ...]
    # the prompt's own (with the first output of a request that asked): position i's at
    # i - 1 - prompt_logprobs_first (those before a /generate logprob_start_len are left out)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_ranks: list[int] = field(default_factory=list)
    prompt_top_logprobs: list[list[list[float]]] = field(default_factory=list)
    prompt_logprobs_first: int = 0
    error: str | None = None
    status: int = 200

    def add(self, delta: TokenOutput) -> None:
        """Take in the next delta of the same request."""
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        self.logprobs.extend(delta.logprobs)
        self.top_logprobs.extend(delta.top_logprobs)
        self.prompt_logprobs.extend(delta.prompt_logprobs)
        self.prompt_ranks.extend(delta.prompt_ranks)
        self.prompt_top_logprobs.extend(delta.prompt_top_logprobs)
        self.prompt_logprobs_first = delta.prompt_logprobs_first or self.prompt_logprobs_first
        self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
        self.completion_tokens = delta.completion_tokens or self.completion_tokens
        self.cached_tokens = delta.cached_tokens or self.cached_tokens
        if delta.finished:
            self.finished = True
            self.finish_reason, self.matched_stop = delta.finish_reason, delta.matched_stop

    @staticmethod
    def failure(rid: str, message: str, status: int = 500) -> TokenOutput:
        return TokenOutput(rid, finished=True, finish_reason="abort", error=message, status=status)

    @staticmethod
    def aborted(rid: str) -> TokenOutput:
        """The request ended without an error (aborted, or declined as a PD room)."""
        return TokenOutput(rid, finished=True, finish_reason="abort")

    @staticmethod
    def from_output(out: RequestOutput) -> TokenOutput:
        prompt = out.prompt_logprobs
        return TokenOutput(
            rid=out.rid,
            token_ids=list(out.new_token_ids),
            text=out.text_delta,
            finished=out.finished,
            finish_reason=out.finish_reason,
            matched_stop=out.matched_stop,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            logprobs=list(out.logprobs),
            top_logprobs=[[[t, lp] for t, lp in row] for row in out.top_logprobs],
            **({} if prompt is None else prompt_fields(prompt)),
        )


def prompt_fields(prompt: PromptLogprobs) -> dict[str, Any]:
    """A request's prompt logprobs as `TokenOutput`'s fields."""
    return {
        "prompt_logprobs_first": prompt.first,
        "prompt_logprobs": list(prompt.logprobs),
        "prompt_ranks": list(prompt.ranks),
        "prompt_top_logprobs": [[[t, lp] for t, lp in row] for row in prompt.top],
    }


NodeMessage = GenerateRequest | AbortRequest | ControlRequest | ControlReply | TokenOutput
CODEC = MessageCodec(NodeMessage.__args__)
