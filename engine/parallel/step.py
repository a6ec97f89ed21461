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

    def encode(self) -> bytes:
        # NOTE: not dataclasses.astuple: it deep-copies every list (a third of a tiny step)
        return msgpack.packb(
            (self.ids, self.q_lens, self.kv_lens, self.page_tables, self.logit_rows, self.mode)
        )

    @staticmethod
    def decode(data: bytes) -> StepPlan:
        return StepPlan(*msgpack.unpackb(data))
