"""Tokenizers: HF tokenizers with chat templates, EOS ids, and incremental detokenization.

Prompts are tokenized by `transformers.AutoTokenizer` itself, so the engine sees exactly the ids
that transformers (our oracle) sees for the same checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from engine.config import checkpoint_dir

REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for bytes that are not (yet) whole UTF-8


def backend_decode(tokenizer: Any) -> Any | None:
    """The Rust tokenizer's own `decode` where transformers' `decode` would only wrap it (no
    space clean-up, `_decode` not overridden), else None. It skips transformers' per-call Python
    work, which the detokenizer pays twice per generated token."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    if getattr(type(tokenizer), "_decode", None) is not TokenizersBackend._decode:
        return None
    return backend.decode


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    """The checkpoint's fast tokenizer, from local files only (never the network)."""
    from transformers import AutoTokenizer

    model_dir = checkpoint_dir(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no tokenizer.json (point --model at an HF checkpoint directory, "
            "or write a tiny one with `pdserve make-model`)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{model_dir} loads a {type(tokenizer).__name__}, not a fast tokenizer")
    return tokenizer


def eos_token_ids(
    model_dir: str | Path, tokenizer: PreTrainedTokenizerFast | None = None
) -> set[int]:
    """Ids that end generation: generation_config.json's eos_token_id (int or list; config.json's
    when there is no generation config, as transformers does) plus the tokenizer's eos token."""
    model_dir = Path(model_dir)
    ids = set(configured_eos_ids(model_dir))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def configured_eos_ids(model_dir: Path) -> list[int]:
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return as_id_list(value)
    return []


def as_id_list(value: int | Iterable[int]) -> list[int]:
    return [value] if isinstance(value, int) else [int(v) for v in value]


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that are always whole characters.

    Byte-level tokens can end inside a multi-byte UTF-8 character (an emoji can span four
    tokens), which decodes to U+FFFD. So each step holds the text back while it ends in U+FFFD,
    and `finish()` releases whatever is held. The deltas concatenate to
    `tokenizer.decode(all_ids, skip_special_tokens=...)`.

    Each step decodes only a short window, not the whole stream:

        ids:  [ ... emitted earlier ... | emitted last time | new (maybe held) ]
                                        ^prefix_offset      ^read_offset

    delta = decode(ids[prefix_offset:])[len(decode(ids[prefix_offset:read_offset])):]
    NOTE: the window starts one emission back, so tokenizers whose decode depends on the token
    before (SentencePiece's leading space) decode the new tokens as they read in the full text.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, *, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend_decode = backend_decode(tokenizer)
        self.token_ids: list[int] = []
        self._deltas: list[str] = []
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def text(self) -> str:
        """All text emitted so far (joins the deltas: O(length), not for every step)."""
        return "".join(self._deltas)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is safe to show (maybe "")."""
        return self.extend([token_id])

    def extend(self, token_ids: Iterable[int]) -> str:
        """Add tokens; return the new text that is safe to show (maybe "")."""
        self.token_ids.extend(token_ids)
        prefix_text, window_text = self._decode_window()
        if window_text.endswith(REPLACEMENT_CHAR) or len(window_text) <= len(prefix_text):
            return ""  # an unfinished character (or nothing new yet): wait for more tokens
        return self._emit(window_text[len(prefix_text) :])

    def finish(self) -> str:
        """Release held text at the end of the stream (a broken tail decodes to U+FFFD).

        Call it once, after the last token."""
        prefix_text, window_text = self._decode_window()
        return self._emit(window_text[len(prefix_text) :])

    def _decode_window(self) -> tuple[str, str]:
        window = self.token_ids[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        return self._decode(window[:read]), self._decode(window)

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        if self._backend_decode is not None:
            return self._backend_decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self._deltas.append(delta)
        return delta
