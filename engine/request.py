"""A request as the engine tracks it.

    sequence = prompt_ids + output_ids
    |<------------- num_computed ------------->|<- to compute ->|
    |<- tree pages (shared, in radix cache) ->|<- own pages ---------->|

`num_computed` tokens have KV in pages. A step computes some of the rest; when it reaches the
end of the sequence, a token is sampled. The first `num_tree_pages` entries of the page table
belong to the radix cache (locked through `node`); the rest belong to the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.prompt_logprobs import PromptLogprobs
from engine.sampling import SamplingParams


class ReqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # PD: pages held outside the batch. RESERVED: a decode node's pages waiting for the
    # prefill node's KV. PARKED: a prefill node's pages being sent after the first token.
    RESERVED = "reserved"
    PARKED = "parked"
    FINISHED = "finished"


@dataclass
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    page_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_tree_pages: int = 0
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache (usage)
    node: Any = None  # locked radix node, or None
    status: ReqStatus = ReqStatus.WAITING
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    sampler_state: Any = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # the prompt's own logprobs, when asked (computed here: never from cached or moved KV)
    prompt_logprobs: PromptLogprobs | None = None
    prefill_only: bool = False  # a prefill node: finish after the first token
    dp_rank: int = 0  # DP attention: the rank whose pool holds this request's KV
    # the last this many prompt_ids are output produced elsewhere before (a moved stream)
    num_resumed: int = 0
    # output text: the detokenizer and stop checker the engine attaches, the text kept so far,
    # and how much of it was already handed out
    detokenizer: Any = None
    stop_checker: Any = None
    text: str = ""
    num_sent_chars: int = 0

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole sequence."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def cacheable_len(self) -> int:
        """How many leading tokens may come from the prefix cache: all but the last, or, while
        prompt positions still need their logits, those before the first of them."""
        if self.prompt_logprobs is not None and self.prompt_logprobs.pending:
            return min(self.prompt_logprobs.next_position, self.seq_len - 1)
        return self.seq_len - 1

    @property
    def own_pages(self) -> list[int]:
        return self.page_table[self.num_tree_pages :]

    @property
    def remaining(self) -> int:
        """Tokens of the sequence whose KV is not computed yet."""
        return self.seq_len - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is ReqStatus.FINISHED
