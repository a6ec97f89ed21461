"""Sampling: per-request parameters, per-request state, and one batched sampler.

One step turns a batch of logits ``[B, V]`` into one token per row, in this order::

    min_tokens mask -> penalties -> logit bias -> grammar mask -> (logprobs) -> temperature
    -> top-k -> top-p -> min-p -> draw

A constrained row (a grammar, engine/grammar.py) only ever draws a token its matcher allows.

Logprobs are ``log_softmax`` of the logits after the min_tokens mask, the penalties and the logit
bias, before temperature and truncation: they do not depend on temperature/top-k/top-p/min-p, so a greedy run
and a sampled run report the same numbers for the same token, and without penalties or bias they
equal ``log_softmax`` of the raw model logits (what ``transformers`` reports).

The draw uses the exponential race: ``argmax(probs / q)`` with ``q ~ Exp(1)`` per vocab entry picks
token ``i`` with probability ``probs[i]``. Only rows that sample are truncated and drawn (greedy
rows take the argmax). Those without a seed share one batched draw from the sampler's own
generator; a row with a seed draws its noise from a generator re-seeded from
``(seed, output position)``, so its tokens do not depend on the batch it rides in, its position in
that batch, or on which node (prefill or decode) drew the token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.grammar import mask_logits

log = logging.getLogger(__name__)

# Temperatures below this are greedy: dividing logits by them only overflows.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a token's bias: [-100, 100]
BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops (names as vLLM / OpenAI spell them)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    # the prompt's own logprobs (engine/prompt_logprobs.py), with this many best tokens each
    prompt_logprobs: int | None = None
    # ... only for the prompt positions from this one on (SGLang's logprob_start_len): the
    # positions before it may come from the prefix cache
    prompt_logprobs_start: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # constrained decoding: (kind, source), kind one of engine/grammar.py's KINDS
    grammar: tuple[str, str] | None = None
    # added to a token's logit before anything is drawn (greedy too): (token id, bias) pairs;
    # OpenAI's map of token-id strings to biases is taken as well
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.grammar is not None:
            object.__setattr__(self, "grammar", tuple(self.grammar))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    def validate(self, max_model_len: int | None = None, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field and how to fix it."""
        problems = _param_problems(self, max_model_len, vocab_size)
        if problems:
            raise ValueError(problems[0])


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as sorted (token id, bias) pairs, from a mapping (OpenAI's string keys) or
    pairs; ValueError naming a key that is not a token id."""
    items = bias.items() if isinstance(bias, Mapping) else (bias or ())
    try:
        return tuple(sorted((_token_id(t), float(b)) for t, b in items))
    except (TypeError, ValueError):
        raise ValueError(
            f'logit_bias must map token ids to numbers, got {bias!r:.80} (e.g. {{"50256": -100}})'
        ) from None


def _token_id(key: Any) -> int:
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise TypeError(key)
    return int(key)


def _param_problems(
    p: SamplingParams, max_model_len: int | None, vocab_size: int | None = None
) -> list[str]:
    bias_ids = [t for t, _ in p.logit_bias]
    checks = [
        (
            p.max_tokens < 1,
            f"max_tokens must be >= 1, got {p.max_tokens} (ask for at least one token)",
        ),
        (
            max_model_len is not None and p.max_tokens > max_model_len,
            f"max_tokens must be <= max_model_len {max_model_len}, got {p.max_tokens} "
            "(lower max_tokens)",
        ),
        (
            not 0 <= p.temperature < math.inf,
            f"temperature must be a finite number >= 0, got {p.temperature} (use 0 for greedy)",
        ),
        (
            not 0 < p.top_p <= 1,
            f"top_p must be in (0, 1], got {p.top_p} (use 1 to disable top-p)",
        ),
        (p.top_k < -1, f"top_k must be -1, 0 or positive, got {p.top_k} (use -1 to disable top-k)"),
        (not 0 <= p.min_p <= 1, f"min_p must be in [0, 1], got {p.min_p} (use 0 to disable min-p)"),
        (
            not 0 < p.repetition_penalty < math.inf,
            f"repetition_penalty must be a finite number > 0, got {p.repetition_penalty} "
            "(use 1 to disable it)",
        ),
        (
            not -2 <= p.frequency_penalty <= 2,
            f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty} "
            "(use 0 to disable it)",
        ),
        (
            not -2 <= p.presence_penalty <= 2,
            f"presence_penalty must be in [-2, 2], got {p.presence_penalty} (use 0 to disable it)",
        ),
        (
            p.min_tokens < 0 or p.min_tokens > p.max_tokens,
            f"min_tokens must be in [0, max_tokens={p.max_tokens}], got {p.min_tokens} "
            "(lower min_tokens or raise max_tokens)",
        ),
        (
            p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS,
            f"logprobs must be in [0, {MAX_LOGPROBS}], got {p.logprobs} "
            "(use None for no logprobs, 0 for the chosen token only)",
        ),
        (
            p.prompt_logprobs is not None and not 0 <= p.prompt_logprobs <= MAX_LOGPROBS,
            f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {p.prompt_logprobs} "
            "(use None for none, 0 for each prompt token's own only)",
        ),
        (
            p.prompt_logprobs_start < 0,
            f"prompt_logprobs_start must be >= 0, got {p.prompt_logprobs_start}",
        ),
        (
            any(not isinstance(s, str) or not s for s in p.stop),
            f"stop must hold non-empty strings, got {p.stop!r} (pass non-empty strings)",
        ),
        (
            any(not isinstance(t, int) or t < 0 for t in p.stop_token_ids),
            f"stop_token_ids must be token ids >= 0, got {p.stop_token_ids!r} "
            "(pass vocabulary ids)",
        ),
        (
            any(not 0 <= t < (vocab_size or math.inf) for t in bias_ids),
            f"logit_bias must name token ids in [0, {vocab_size}), got "
            f"{_outside(bias_ids, vocab_size)} (pass vocabulary ids)",
        ),
        (
            any(not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for _, b in p.logit_bias),
            f"logit_bias must map tokens to biases in [-100, 100], got "
            f"{dict(p.logit_bias)!r:.120} (use -100 to ban a token, 100 to force it)",
        ),
        *[
            (
                not isinstance(getattr(p, name), bool),
                f"{name} must be true or false, got {getattr(p, name)!r:.40} (send a boolean)",
            )
            for name in BOOL_FIELDS
        ],
    ]
    grammar = "" if p.grammar is None else _grammar_problem(p.grammar)
    return [message for bad, message in checks if bad] + ([grammar] if grammar else [])


def _outside(ids: Sequence[int], vocab_size: int | None) -> int | None:
    return next((t for t in ids if not 0 <= t < (vocab_size or math.inf)), None)


def _grammar_problem(grammar: tuple[str, str]) -> str:
    from engine.grammar import grammar_error

    if len(grammar) != 2 or not all(isinstance(x, str) for x in grammar):
        return f"grammar must be a (kind, source) pair of strings, got {grammar!r}"
    return grammar_error(*grammar)


@dataclass
class SamplerState:
    """What the sampler remembers about one request between steps; the engine keeps one each.

    The caller appends every token the request outputs (``state.append(token_id)``), the first
    one included; a decode node resuming a request appends the tokens the prefill node drew.
    """

    seed: int | None
    prompt_token_ids: frozenset[int] = frozenset()
    output_counts: dict[int, int] = field(default_factory=dict)
    num_output_tokens: int = 0
    matcher: Any = None  # constrained decoding: the request's grammar matcher (engine/grammar.py)
    rejected: bool = False  # the matcher refused an output token
    _generator: torch.Generator | None = field(default=None, repr=False)
    _prompt_ids_tensor: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: Sequence[int]) -> SamplerState:
        # Only the repetition penalty reads the prompt; skip the set for everyone else.
        prompt = frozenset(prompt_ids) if params.repetition_penalty != 1.0 else frozenset()
        return cls(seed=params.seed, prompt_token_ids=prompt)

    def append(self, token_id: int) -> None:
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        self.num_output_tokens += 1
        matcher = self.matcher
        if matcher is not None and not matcher.is_terminated() and not self.rejected:
            # NOTE: every draw of a constrained request is masked (on prefill and decode alike),
            # so a refused token is a bug: said loudly, and the request ends there
            self.rejected = not matcher.accept_token(token_id)
            if self.rejected:
                log.error("token %d breaks the request's grammar; ending the request", token_id)

    @property
    def grammar_done(self) -> bool:
        """The grammar has ended: its matcher accepted a stop token where the grammar may end
        (or refused a token, which `append` logged)."""
        return self.matcher is not None and (self.rejected or self.matcher.is_terminated())

    def generator_for_step(self, device: torch.device) -> torch.Generator:
        """This request's generator, seeded for its current output position.

        NOTE: re-seeding from (seed, position) instead of letting one stream run on makes the draw
        for position i the same on a prefill node, a decode node, or after a recompute.
        """
        assert self.seed is not None, "generator_for_step needs a seeded request"
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(step_seed(self.seed, self.num_output_tokens))
        return self._generator

    def prompt_ids_tensor(self, device: torch.device) -> torch.Tensor:
        if self._prompt_ids_tensor is None or self._prompt_ids_tensor.device != device:
            ids = sorted(self.prompt_token_ids)
            self._prompt_ids_tensor = torch.tensor(ids, dtype=torch.long, device=device)
        return self._prompt_ids_tensor


def step_seed(seed: int, position: int) -> int:
    """A well-mixed 64-bit seed for output position ``position`` of a request seeded ``seed``."""
    x = ((seed & _U64) * 0x9E3779B97F4A7C15 + position) & _U64
    # splitmix64 finalizer: nearby (seed, position) pairs give unrelated seeds.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


@dataclass(frozen=True)
class SampleOutput:
    """One step's picks. ``logprobs`` / ``top_logprobs`` are None when no row asked for them;
    otherwise ``logprobs`` has every row's chosen-token logprob and ``top_logprobs[i]`` holds row
    i's ``params.logprobs`` best ``(token_id, logprob)`` pairs, best first (empty for 0 or None)."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Sampler:
    """Picks one token per row of a logits batch. Holds the generator for unseeded requests."""

    def __init__(self, eos_token_ids: frozenset[int] = frozenset(), seed: int | None = None):
        self.eos_token_ids = frozenset(eos_token_ids)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        states: Sequence[SamplerState],
    ) -> SampleOutput:
        """One token per row of ``logits [B, V]`` (any float dtype; not modified).

        Row ``i`` follows ``params[i]`` and reads ``states[i]``; the caller then appends the
        chosen token to each state (the sampler never does, so a step can be dropped or redone).
        """
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(states):
            raise ValueError(
                f"Sampler got logits {tuple(logits.shape)}, {len(params)} params and "
                f"{len(states)} states (pass one params and one state per logits row)"
            )
        logits = self._processed_logits(logits.float(), params, states)
        constrained = [i for i, s in enumerate(states) if s.matcher is not None]
        if constrained:
            logits = logits.clone()  # the caller's logits stay as they were
            mask_logits(logits, constrained, [states[i].matcher for i in constrained])
        if all(p.is_greedy for p in params):
            token_ids = argmax_rows(logits)
        else:
            token_ids = self._sample(logits, params, states)
        return _with_logprobs(logits, token_ids, params)

    def _processed_logits(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[SamplerState]
    ) -> torch.Tensor:
        logits = self._mask_early_stops(logits, params, states)
        logits = self._penalized(logits, params, states)
        return apply_logit_bias(logits, params)

    def _penalized(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[SamplerState]
    ) -> torch.Tensor:
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if not rows:
            return logits
        picked = [params[i] for i in rows]
        penalized = apply_penalties(
            logits[rows],
            *_penalty_inputs([states[i] for i in rows], logits.shape[1], logits.device),
            repetition=_column(picked, "repetition_penalty", logits.device),
            frequency=_column(picked, "frequency_penalty", logits.device),
            presence=_column(picked, "presence_penalty", logits.device),
        )
        if len(rows) == len(params):
            return penalized
        logits = logits.clone()
        logits[rows] = penalized
        return logits

    def _mask_early_stops(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[SamplerState]
    ) -> torch.Tensor:
        """Forbid EOS and stop tokens for rows that have not yet output ``min_tokens`` tokens."""
        rows: list[int] = []
        cols: list[int] = []
        vocab = logits.shape[1]
        for i, (p, s) in enumerate(zip(params, states, strict=True)):
            if s.num_output_tokens >= p.min_tokens:
                continue
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            ids = [t for t in sorted(banned) if t < vocab]
            rows += [i] * len(ids)
            cols += ids
        if not rows:
            return logits
        logits = logits.clone()
        logits[rows, cols] = float("-inf")
        return logits

    def _sample(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[SamplerState]
    ) -> torch.Tensor:
        """Greedy rows take the argmax; only the sampled rows go through truncation and the
        draw (a [B, V] sort and noise for rows that do not sample would cost more than all the
        rest at a 150k vocabulary)."""
        token_ids = argmax_rows(logits)
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        device = logits.device
        picked = [params[i] for i in rows]
        temperature = torch.tensor([p.temperature for p in picked], device=device)
        scaled = apply_top_k_top_p(
            logits[rows] / temperature[:, None],
            _column(picked, "top_k", device) if any(p.top_k > 0 for p in picked) else None,
            _column(picked, "top_p", device) if any(p.top_p < 1 for p in picked) else None,
        )
        if any(p.min_p > 0 for p in picked):
            scaled = apply_min_p(scaled, _column(picked, "min_p", device))
        noise = self._exponential_noise(scaled, [states[i] for i in rows])
        token_ids[rows] = argmax_rows(scaled.softmax(dim=-1) / noise)
        return token_ids

    def _exponential_noise(
        self, like: torch.Tensor, states: Sequence[SamplerState]
    ) -> torch.Tensor:
        """Exp(1) noise for each row, as -log(U) with U ~ Uniform[0, 1): on CPU a uniform draw
        is about 7x faster than `exponential_` (0.55 against 3.7 ms for 152k values here)."""
        noise = torch.empty_like(like)
        shared = [i for i, s in enumerate(states) if s.seed is None]
        if shared:
            draw = torch.empty((len(shared), like.shape[1]), dtype=like.dtype, device=like.device)
            noise[shared] = draw.uniform_(generator=self._generator(like.device))
        for i, s in enumerate(states):
            if s.seed is not None:
                noise[i].uniform_(generator=s.generator_for_step(like.device))
        # NOTE: U = 0 gives +inf (that token cannot win: harmless); the clamp keeps -log(U) above
        # 0, where 0/0 would be NaN and argmax could pick a banned token
        return noise.log_().neg_().clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed & _U64)
            self._generators[device] = generator
        return self._generators[device]


def plain_greedy(
    params: Sequence[SamplingParams], states: Sequence[SamplerState], masked: bool = False
) -> bool:
    """True when every row's token is just the argmax of its raw logits and nothing else is
    wanted from them: greedy, no logprobs, no penalties, no logit bias, no min_tokens ban still
    in force. With `masked` (an LM head that takes a grammar's token bitmask) constrained rows
    count too."""
    return all(
        p.is_greedy
        and p.logprobs is None
        and not p.has_penalties
        and not p.logit_bias
        and s.num_output_tokens >= p.min_tokens
        and (masked or s.matcher is None)
        for p, s in zip(params, states, strict=True)
    )


def argmax_rows(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a 2-D float tensor: the first index of each row's maximum.

    On CPU, ATen's argmax over a long last dimension is not vectorized (1.3 ms for 16 rows of a
    152k vocabulary here) while ``amax`` is (0.1 ms). So: the max of each block of ``block``
    columns, the first block holding the row's max, then the first max inside that block; the
    columns past the last whole block are checked on their own.
    """
    rows, cols = x.shape
    if x.device.type != "cpu" or cols < 4 * block:
        return x.argmax(dim=-1)
    whole = cols - cols % block
    blocks = x[:, :whole].contiguous().view(rows, whole // block, block)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)
    picked = best_block * block + blocks[torch.arange(rows), best_block].argmax(dim=-1)
    if whole == cols:
        return picked
    tail = x[:, whole:]
    tail_pick = tail.argmax(dim=-1, keepdim=True)
    # strictly greater: on a tie the earlier (block) index wins, as argmax's first-index rule says
    beats = tail.gather(1, tail_pick) > x.gather(1, picked[:, None])
    return torch.where(beats[:, 0], tail_pick[:, 0] + whole, picked)


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


def _penalty_inputs(
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


def _column(params: Sequence[SamplingParams], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(p, name) for p in params], device=device)


def _with_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
) -> SampleOutput:
    wanted = [p.logprobs for p in params]
    if all(n is None for n in wanted):
        return SampleOutput(token_ids=token_ids.tolist())
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, token_ids[:, None]).squeeze(-1).tolist()
    widest = max(n or 0 for n in wanted)
    tops: list[list[tuple[int, float]]] = [[] for _ in params]
    if widest > 0:
        values, ids = logprobs.topk(widest, dim=-1)
        for row, (n, vs, ts) in enumerate(zip(wanted, values.tolist(), ids.tolist(), strict=True)):
            tops[row] = list(zip(ts[: n or 0], vs[: n or 0], strict=True))
    return SampleOutput(token_ids=token_ids.tolist(), logprobs=chosen, top_logprobs=tops)
