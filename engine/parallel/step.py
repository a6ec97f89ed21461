"""A step as rank 0 hands it to the other ranks: plain lists, msgpack-encoded (nothing pickled).

Everything a rank needs to run the same forward: the step's token ids, each request's new and
total token counts (positions follow from them), the page tables, the rows that reach the LM
head, and how the logits are wanted (`mode`): not at all, greedy ids only, or whole. Steps that
hold a request asking for its prompt's logprobs also name those rows (engine/prompt_logprobs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgpack

LogitsMode = Literal["none", "argmax", "logits"]


@dataclass(frozen=True)
class StepPlan:
    ids: list[int]
    q_lens: list[int]
    kv_lens: list[int]
    page_tables: list[list[int]]
    logit_rows: list[int]
    mode: LogitsMode
    # prompt logprobs: the rows reduced, the token each one predicts, the most best tokens asked
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_top: int = 0

    def positions(self) -> list[int]:
        out: list[int] = []
        for q, kv in zip(self.q_lens, self.kv_lens):
            out.extend(range(kv - q, kv))
        return out

    def decodes_only(self) -> bool:
        """Whether every request computes one token: the step's tokens are its requests."""
        return all(q == 1 for q in self.q_lens)

    def astuple(self) -> tuple:
        # NOTE: not dataclasses.astuple: it deep-copies every list (a third of a tiny step)
        return (
            self.ids, self.q_lens, self.kv_lens, self.page_tables, self.logit_rows, self.mode,
            self.prompt_rows, self.prompt_targets, self.prompt_top,
        )  # fmt: skip

    def encode(self) -> bytes:
        return msgpack.packb(self.astuple())

    @staticmethod
    def decode(data: bytes) -> StepPlan:
        return StepPlan(*msgpack.unpackb(data))


def encode_plans(plans: list[StepPlan]) -> bytes:
    """DP attention: every rank's own plan, in rank order."""
    return msgpack.packb([p.astuple() for p in plans])


def decode_plans(data: bytes) -> list[StepPlan]:
    return [StepPlan(*p) for p in msgpack.unpackb(data)]
