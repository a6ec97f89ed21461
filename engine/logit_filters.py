"""What the sampler (engine/sampler.py) does to a batch of logits before it draws: repetition,
frequency and presence penalties, logit bias, top-k, top-p (nucleus) and min-p, each on the rows
that ask for it, batched; a filtered-out token's logit becomes -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampling import SamplerState, SamplingParams


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    *,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """Penalized copy of ``logits [B, V]``.

    Repetition (HF/CTRL): every token in the prompt or the output so far has a positive logit
    divided by ``repetition[b]``, a negative one multiplied. Then frequency and presence (OpenAI),
    over output tokens only: ``logit -= frequency[b] * count + presence[b] * (count > 0)``.
    ``prompt_mask`` is bool ``[B, V]``, ``output_counts`` is ``[B, V]``, the penalties ``[B]``.
    """
    counts = output_counts.to(logits.dtype)
    appeared = counts > 0
    rep = repetition[:, None].to(logits.dtype)
    repeated = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(prompt_mask | appeared, repeated, logits)
    logits = logits - frequency[:, None].to(logits.dtype) * counts
    return logits - presence[:, None].to(logits.dtype) * appeared.to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``logits [B, V]`` with each row's ``logit_bias`` added (a copy when any row has one)."""
    rows, cols, values = [], [], []
    for row, p in enumerate(params):
        for token, bias in p.logit_bias:
            rows.append(row)
            cols.append(token)
            values.append(bias)
    if not rows:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    bias = torch.tensor(values, dtype=logits.dtype, device=device)
    return logits.index_put(index, bias, accumulate=True)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Logits with everything outside each row's top-k, then top-p, set to -inf.

    ``top_k[b] <= 0`` keeps all; exactly k tokens survive, ties broken towards the lower id.
    Top-p keeps the smallest set of best tokens (renormalized after top-k) whose mass reaches
    ``top_p[b]``; the best token always survives, and ``top_p[b] >= 1`` keeps all.
    """
    if top_p is None:
        return logits if top_k is None else apply_top_k(logits, top_k)
    if top_k is not None:
        logits = apply_top_k(logits, top_k)  # top-p then sees the renormalized top-k
    counts = nucleus_sizes(logits, top_p)
    if counts is not None:
        return apply_top_k(logits, counts)
    return sorted_top_p(logits, top_p)


NUCLEUS_CANDIDATES = 1024
"""Top-p looks for each row's nucleus among its best this many tokens first (a partial top-k,
not a sort of the vocabulary); a row whose nucleus is wider takes the full sort."""


def nucleus_sizes(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor | None:
    """How many best tokens top-p keeps in each row (the vocabulary where top_p >= 1), from the
    row's NUCLEUS_CANDIDATES best values alone; None when a row's nucleus may be wider. Which
    tokens those are, ties included, is top-k's rule: the sorted values, not their order among
    equals, decide the mass before each position."""
    vocab = logits.shape[1]
    values = logits.topk(min(NUCLEUS_CANDIDATES, vocab), dim=-1).values
    probs = (values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    whole = top_p >= 1
    counts = (mass_before < top_p[:, None].to(probs.dtype)).sum(dim=-1)
    if bool(((counts == values.shape[1]) & ~whole).any()) and values.shape[1] < vocab:
        return None
    return torch.where(whole, vocab, counts)


def sorted_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p over each row's full sort (a nucleus too wide for `nucleus_sizes`)."""
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = ordered.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # NOTE: p >= 1 must keep everything, and the cumsum's rounding can pass 1.0 on the tail.
    p = torch.where(top_p >= 1, float("inf"), top_p.to(probs.dtype))
    ordered = ordered.masked_fill(mass_before >= p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ordered)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k alone, without sorting the vocabulary: the k-th best value of each row (a partial
    top-k of the largest k asked), every token above it, and as many of the tokens equal to it,
    lowest ids first, as make k (the sort's tie rule)."""
    vocab = logits.shape[1]
    active = (top_k > 0) & (top_k < vocab)
    if not bool(active.any()):
        return logits
    k = torch.where(active, top_k, 1)
    widest = int(k.max())
    kth = logits.topk(widest, dim=-1).values.gather(1, (k - 1)[:, None])
    keep = logits >= kth
    tied_past_k = active & (keep.sum(dim=-1) > k)
    if bool(tied_past_k.any()):  # rare with float logits: only those rows count their ties
        rows = tied_past_k.nonzero()[:, 0]
        sub, sub_kth = logits[rows], kth[rows]
        above, tied = sub > sub_kth, sub == sub_kth
        room = k[rows, None] - above.sum(dim=-1, keepdim=True)
        keep[rows] = above | (tied & (tied.cumsum(dim=-1) <= room))
    return logits.masked_fill(~(keep | ~active[:, None]), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Logits with every token whose probability is below ``min_p[b]`` times the row's best
    token's probability set to -inf (compared in log space: no softmax needed)."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p.to(logits.dtype))[:, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def penalty_inputs(
    states: Sequence[SamplerState], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``prompt_mask [R, V]`` and ``output_counts [R, V]`` for the penalized rows."""
    prompt_flat, count_flat, count_values = [], [], []
    for row, s in enumerate(states):
        if s.prompt_token_ids:
            prompt_flat.append(s.prompt_ids_tensor(device) + row * vocab)
        count_flat += [row * vocab + t for t in s.output_counts]
        count_values += list(s.output_counts.values())
    prompt_mask = torch.zeros(len(states) * vocab, dtype=torch.bool, device=device)
    if prompt_flat:
        prompt_mask[torch.cat(prompt_flat)] = True
    counts = torch.zeros(len(states) * vocab, dtype=torch.float32, device=device)
    if count_flat:
        index = torch.tensor(count_flat, dtype=torch.long, device=device)
        counts[index] = torch.tensor(count_values, dtype=torch.float32, device=device)
    return prompt_mask.view(-1, vocab), counts.view(-1, vocab)


def param_column(params: Sequence[SamplingParams], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(p, name) for p in params], device=device)
