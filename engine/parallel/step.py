"""A step as rank 0 hands it to the other ranks: plain lists, msgpack-encoded (nothing pickled).

Everything a rank needs to run the same forward: the step's token ids, each request's new and
total token counts (positions follow from them), the page tables, the rows that reach the LM
head, and how the logits are wanted (`mode`): not at all, greedy ids only, or whole.
"""

from __future__ import annotations

from dataclasses import dataclass
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
        return self.ids, self.q_lens, self.kv_lens, self.page_tables, self.logit_rows, self.mode

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
