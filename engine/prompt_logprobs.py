"""Prompt logprobs: how likely each prompt token was, given the tokens before it.

A request asking for them (`SamplingParams.prompt_logprobs`: k best tokens per position) gets,
for every prompt position i >= 1, log_softmax(logits at position i - 1)[prompt[i]], that token's
rank, and the k best tokens there, in float32. Prefill computes every prompt position's hidden
state anyway; only more rows go through the LM head:

    prompt:     t0        t1        t2        t3   | t4 (sampled)
    hidden:     h0        h1        h2        h3
    reported:   None   lp(t1|h0) lp(t2|h1) lp(t3|h2)    rows h0 .. h(L-2); h(L-1) samples

A step's plan lists those rows and the token each predicts (`StepPlan.prompt_rows`,
`prompt_targets`), chunk by chunk of a chunked prefill; the runner reduces their logits slice
by slice (`reduce_rows`: never a [prompt, vocab] tensor at once) to (logprob, rank, top ids,
top logprobs), and `PromptRows.scatter` hands each request its part. Steps without such a
request plan and run exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampler import argmax_rows

SLICE_ROWS = 256  # rows whose full-vocabulary logits exist at once (152k vocab: 156 MB)


@dataclass
class PromptLogprobs:
    """One request's prompt logprobs as they come in: entry j is prompt position first + j + 1's
    (`first` > 0: SGLang's logprob_start_len, the positions before it not wanted)."""

    total: int  # every prompt token but the first
    first: int = 0  # the first hidden position reported; those before it may come from cache
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)  # 1 = the likeliest token
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # best first
    sent: bool = False  # handed out with the request's first output

    @property
    def next_position(self) -> int:
        """The first hidden position still wanted: tokens before it may come from the cache."""
        return self.first + len(self.logprobs)

    @property
    def pending(self) -> bool:
        return self.next_position < self.total

    def positions(self, computed: int, n: int) -> range:
        """The hidden positions (each predicting the next prompt token) still wanted among the
        step's [computed, computed + n): a recomputed request (retracted) skips what it has."""
        return range(max(computed, self.next_position), min(computed + n, self.total))


@dataclass
class PromptRows:
    """A step's prompt-logprob rows, built with the plan on rank 0: the flattened hidden rows,
    the token each predicts, the widest top-k asked, and whose rows they are, in order."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    top: int = 0
    owners: list[tuple[Any, int]] = field(default_factory=list)  # (Req, rows)

    def add(self, req: Any, n: int, first_row: int) -> None:
        """The rows of `req`'s `n` tokens this step, its first at `first_row`, if it wants any."""
        wanted: PromptLogprobs | None = req.prompt_logprobs
        if wanted is None:
            return
        positions = wanted.positions(req.num_computed, n)
        if not positions:
            return
        shift = first_row - req.num_computed
        self.rows.extend(range(positions.start + shift, positions.stop + shift))
        self.targets.extend(req.prompt_ids[positions.start + 1 : positions.stop + 1])
        self.top = max(self.top, req.params.prompt_logprobs)
        self.owners.append((req, len(positions)))

    def scatter(self, reduced: torch.Tensor) -> None:
        """`reduce_rows`' result (rank 0's) to each owner's `PromptLogprobs`."""
        values, start = reduced.cpu().tolist(), 0
        for req, count in self.owners:
            into: PromptLogprobs = req.prompt_logprobs
            k = req.params.prompt_logprobs
            for row in values[start : start + count]:
                into.logprobs.append(row[0])
                into.ranks.append(int(row[1]))
                ids, lps = row[2 : 2 + k], row[2 + self.top : 2 + self.top + k]
                into.top.append([(int(t), v) for t, v in zip(ids, lps, strict=True)])
            start += count


def reduced_width(top: int) -> int:
    """Columns of `reduce_rows`' result: logprob, rank, `top` ids, `top` logprobs."""
    return 2 + 2 * top


def reduce_rows(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    top: int,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    slice_rows: int = SLICE_ROWS,
) -> torch.Tensor:
    """float64 [rows, reduced_width(top)]: for each row of `hidden`, the logprob of its target
    token, that token's rank (how many tokens are at least as likely, itself included: vLLM's
    rule), and the `top` best token ids and logprobs. `logits_of` gives float32 logits over
    the whole vocabulary (on every rank of a group: it may be a collective)."""
    parts = [
        reduce_logits(logits_of(hidden[s : s + slice_rows]), targets[s : s + slice_rows], top)
        for s in range(0, len(hidden), slice_rows)
    ]
    return torch.cat(parts)


def reduce_logits(logits: torch.Tensor, targets: torch.Tensor, top: int) -> torch.Tensor:
    """`reduce_rows` of one slice. NOTE: each pass over [rows, vocab] counts (a 152k vocab: ~10
    ms per 256 rows here), so the row maxima come from the top-k (k <= 1: the block-wise argmax)
    and serve the normalizer too."""
    logits = logits.float()
    if top > 1:
        values, ids = logits.topk(top, dim=-1)
        best = values[:, :1]
    else:
        ids = argmax_rows(logits)[:, None]
        values = best = logits.gather(1, ids)
    norm = best + (logits - best).exp_().sum(dim=-1, keepdim=True).log_()
    chosen = logits.gather(1, targets[:, None])
    rank = (logits >= chosen).sum(dim=-1, keepdim=True, dtype=torch.int32)
    columns = [chosen - norm, rank]
    if top > 0:
        columns += [ids, values - norm]
    return torch.cat([c.double() for c in columns], dim=1)
