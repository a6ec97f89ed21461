"""Deciding, token by token, whether a request is finished and what text it keeps.

A request stops with finish_reason "stop" on EOS (unless ``ignore_eos``), on one of its
``stop_token_ids``, or when its output text contains one of its ``stop`` strings; it stops with
"length" once it has ``max_tokens`` tokens. ``matched_stop`` records what stopped it (the token id
or the string, as SGLang reports it). None of the "stop" causes count before ``min_tokens`` tokens
are out (the sampler also keeps EOS and stop tokens from being drawn then).

Stop strings are searched only in the text a token added, plus ``len(stop) - 1`` characters before
it, so a request costs O(output length), not O(n^2). While streaming, the caller holds back the
tail that could still grow into a stop string (``StopResult.hold_back``), so a client never sees
text that a later token cuts away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from engine.sampling import SamplingParams
from engine.tokenizer import IncrementalDetokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StopResult:
    """The verdict after one token.

    ``text`` is the output text to keep: cut before the stop string (or after it with
    ``include_stop_str_in_output``), and without the stop token's own text unless included.
    ``hold_back`` is how many trailing characters of ``text`` must not be streamed yet; it is 0
    once the request has finished.
    """

    finish_reason: FinishReason | None
    matched_stop: int | str | None
    text: str
    hold_back: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def streamable_text(self) -> str:
        """The prefix of ``text`` that can be shown to a client now."""
        return self.text[: len(self.text) - self.hold_back]


def replay_text(
    detokenizer: IncrementalDetokenizer, token_ids: Sequence[int], stops: Sequence[str]
) -> tuple[str, str]:
    """(text kept, text shown) after `token_ids` were streamed, fed one by one as a stream feeds
    them (at once, a character split over the last tokens would hold back more)."""
    text = "".join([detokenizer.push(token) for token in token_ids])
    return text, shown_text(text, stops)


def shown_text(text: str, stops: Sequence[str]) -> str:
    """What a stream has shown of an unfinished request's output ``text``: all of it but the tail
    that may still grow into a stop string."""
    return text[: len(text) - stop_hold_back(text, stops)]


@dataclass(frozen=True)
class StopChecker:
    """Stop rules of one request; ``eos_token_ids`` come from the model's generation config."""

    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()

    def check(self, token_id: int, num_output_tokens: int, text: str, new_chars: int) -> StopResult:
        """Verdict after ``token_id``, the ``num_output_tokens``-th output token, was appended.

        ``text`` is the whole detokenized output so far and ``new_chars`` how many characters at
        its end this token added (0 when the detokenizer is waiting for more bytes).
        """
        if num_output_tokens > self.params.min_tokens:
            stopped = self._stop_by_token(token_id, text, new_chars) or self._stop_by_string(
                text, new_chars
            )
            if stopped is not None:
                return stopped
        if num_output_tokens >= self.params.max_tokens:
            return StopResult("length", None, text)
        return StopResult(None, None, text, stop_hold_back(text, self.params.stop))

    def _stop_by_token(self, token_id: int, text: str, new_chars: int) -> StopResult | None:
        is_eos = token_id in self.eos_token_ids and not self.params.ignore_eos
        if token_id not in self.params.stop_token_ids and not is_eos:
            return None
        if not self.params.include_stop_str_in_output:
            text = text[: len(text) - new_chars]
        return StopResult("stop", token_id, text)

    def _stop_by_string(self, text: str, new_chars: int) -> StopResult | None:
        match = find_stop_string(text, new_chars, self.params.stop)
        if match is None:
            return None
        start, stop = match
        end = start + len(stop) if self.params.include_stop_str_in_output else start
        return StopResult("stop", stop, text[:end])


def find_stop_string(text: str, new_chars: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """``(index, stop)`` of the earliest stop string that ends in the last ``new_chars`` characters
    of ``text``, or None. The earliest start wins; at the same start the shorter string wins."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or (index, len(stop)) < (best[0], len(best[1]))):
            best = (index, stop)
    return best


def stop_hold_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string: those
    characters may yet become a stop string and be cut, so they must not be streamed."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
