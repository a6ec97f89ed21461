"""Grammar-constrained decoding with xgrammar: JSON schemas, any JSON object, regexes, EBNF.

A request's `SamplingParams.grammar` is a `(kind, source)` pair. The engine compiles it once per
distinct pair (xgrammar's compiler caches too) and gives the request a matcher, which lives in
its `SamplerState`: every token the request outputs advances it (the first one included, and a
decode node replays the prefill node's first token into a fresh matcher the same way), and
before each draw the sampler masks the logits of every constrained row to the tokens the matcher
allows next (greedy steps on a CPU LM head with the int8 pass skip the logits: the head takes the
bitmask and picks each row's best allowed token). When the matcher has accepted the end of the grammar (a stop token where the grammar
may end) the request finishes with "stop".

JSON is compiled without free whitespace between tokens (`any_whitespace=False`): the output is
compact JSON, and a model (random weights above all) cannot wander off into whitespace forever.
xgrammar is imported only when a request asks for a grammar.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from importlib import import_module
from typing import Any

import torch

KINDS = ("json_schema", "json_object", "regex", "ebnf")
MAX_CACHED = 256  # compiled grammars kept (least recently used dropped first)


def grammar_error(kind: str, source: str) -> str:
    """Why (kind, source) is not a grammar request we take ("" when it is, before compiling)."""
    if kind not in KINDS:
        return f"unknown grammar kind {kind!r} (use one of {', '.join(KINDS)})"
    if kind == "json_schema":
        try:
            schema = json.loads(source)
        except ValueError as exc:
            return f"json_schema is not valid JSON: {exc}"
        if not isinstance(schema, dict | bool):
            return "json_schema must be a JSON object (a JSON Schema)"
    elif kind != "json_object" and not source:
        return f"{kind} is empty"
    return ""


class Grammars:
    """Compiles grammars for one tokenizer and vocabulary, and makes matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._compiled: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _xgr(self) -> Any:
        try:
            return import_module("xgrammar")
        except ImportError:
            raise ValueError(
                "constrained decoding (response_format, json_schema, regex, ebnf) needs "
                "xgrammar: pip install 'xgrammar==0.2.*'"
            ) from None

    def is_compiled(self, kind: str, source: str) -> bool:
        with self._lock:
            return (kind, source) in self._compiled

    def compiled(self, kind: str, source: str) -> Any:
        """The compiled grammar of (kind, source); ValueError naming the problem if it is not
        one. Safe from two threads (the node compiles off its loop: node/grammar_queue.py);
        the compile itself runs outside the lock."""
        key = (kind, source)
        with self._lock:
            if key in self._compiled:
                self._compiled[key] = self._compiled.pop(key)  # most recently used last
                return self._compiled[key]
        error = grammar_error(kind, source)
        if error:
            raise ValueError(error)
        try:
            grammar = self._compile(self._compiler_once(), kind, source)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"invalid {kind}: {str(exc).splitlines()[0][:300]}") from None
        with self._lock:
            if len(self._compiled) >= MAX_CACHED:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = grammar
        return grammar

    def _compiler_once(self) -> Any:
        xgr = self._xgr()
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    @staticmethod
    def _compile(compiler: Any, kind: str, source: str) -> Any:
        if kind == "json_schema":
            return compiler.compile_json_schema(source, any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(source)
        return compiler.compile_grammar(source)

    def matcher(self, kind: str, source: str) -> Any:
        """A fresh matcher at the start of the grammar."""
        return self._xgr().GrammarMatcher(self.compiled(kind, source))


def token_bitmask(batch: int, vocab: int, rows: Sequence[int], matchers: Sequence[Any]) -> Any:
    """The int32 bitmask [batch, ceil(vocab / 32)] of the tokens each row may take next: what
    its matcher allows for `rows`, every token for the others."""
    xgr = import_module("xgrammar")
    bitmask = xgr.allocate_token_bitmask(batch, vocab)  # all bits set
    for row, matcher in zip(rows, matchers, strict=True):
        matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def mask_logits(logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[Any]) -> None:
    """Set to -inf, in place, every token the matchers of `rows` do not allow next."""
    xgr = import_module("xgrammar")
    vocab = logits.shape[1]
    # NOTE: one bitmask row per logits row, so the mask applies in place on the constrained
    # rows themselves, with no copy of them out and back
    bitmask = token_bitmask(logits.shape[0], vocab, rows, matchers)
    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device), vocab_size=vocab, indices=list(rows)
    )
