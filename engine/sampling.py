"""Sampling parameters (`SamplingParams`: one request's, checked when made) and what the sampler
remembers about a request between steps (`SamplerState`: its output counts, its grammar matcher,
its seeded generator). The batched sampler that uses them is engine/sampler.py; the logit
filters it applies (penalties, bias, top-k, top-p, min-p) are engine/logit_filters.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# Temperatures below this are greedy: dividing logits by them only overflows.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a token's bias: [-100, 100]
BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
U64 = (1 << 64) - 1


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
    x = ((seed & U64) * 0x9E3779B97F4A7C15 + position) & U64
    # splitmix64 finalizer: nearby (seed, position) pairs give unrelated seeds.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    return x ^ (x >> 31)
