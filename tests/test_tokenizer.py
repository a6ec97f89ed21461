"""Tokenizer helpers and incremental detokenization (whole characters only, equal to a full decode)."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from api.chat import TemplateOptions, chat_prompt_ids
from api.errors import ApiError
from engine.tokenizer import IncrementalDetokenizer, backend_decode, eos_token_ids, load_tokenizer

TOKENIZERS = ["qwen", "deepseek"]
REPLACEMENT = "\ufffd"  # what a decode shows for broken UTF-8
TEXTS = [
    "Hello, world! Plain ASCII text.",
    "Emoji: 😀👍🏽🇺🇸 and a family 👨‍👩‍👧 and a giraffe 🦒.",
    "中文文本和日本語のテキスト、한국어 텍스트。",
    "Accents: naïve café, façade, Ærøskøbing, Ελληνικά, Привет, العربية.",
    "Mixed 🦒長頸鹿 q\u0301 ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🫠𓀀𠀀 ` \n\t end",  # NFC-stable (no é from e + U+0301)
]


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.push(token) for token in ids] + [detokenizer.finish()]


def random_ids(rng: random.Random, vocab: int) -> list[int]:
    """Mostly low ids (single bytes, often partial UTF-8) with some from the whole vocab."""
    return [
        rng.randrange(vocab) if rng.random() < 0.3 else rng.randrange(256)
        for _ in range(rng.randint(1, 40))
    ]


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_streams_equal_full_decode(tiny_tokenizer, name: str, skip_special_tokens) -> None:
    tokenizer = tiny_tokenizer(name)
    rng = random.Random(1234)
    for _ in range(150):
        ids = random_ids(rng, len(tokenizer))
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        deltas = stream(detokenizer, ids)
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == full == detokenizer.text, ids


@pytest.mark.parametrize("name", TOKENIZERS)
def test_backend_decode_is_taken_and_equals_decode(tiny_tokenizer, name: str) -> None:
    """The detokenizer's fast path (the Rust decode) is used for these tokenizers and gives
    exactly what transformers' decode gives."""
    tokenizer = tiny_tokenizer(name)
    fast = backend_decode(tokenizer)
    assert fast is not None
    rng = random.Random(99)
    for _ in range(100):
        ids = random_ids(rng, len(tokenizer))
        for skip in (True, False):
            assert fast(ids, skip_special_tokens=skip) == tokenizer.decode(
                ids, skip_special_tokens=skip
            )
    assert backend_decode(SimpleNamespace(decode=tokenizer.decode)) is None


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))  # NFC texts: decode gives them back
def test_valid_text_streams_whole_characters(tiny_tokenizer, name: str, text: str) -> None:
    tokenizer = tiny_tokenizer(name)
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in d for d in deltas), deltas


@pytest.mark.parametrize("name", TOKENIZERS)
def test_chunks_and_specials_stream_like_single_tokens(tiny_tokenizer, name: str) -> None:
    tokenizer = tiny_tokenizer(name)
    chat = [{"role": "user", "content": TEXTS[1]}, {"role": "assistant", "content": TEXTS[2]}]
    ids = chat_prompt_ids(tokenizer, chat, options=TemplateOptions(add_generation_prompt=False))
    for skip in (True, False):
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        deltas = [detokenizer.extend(ids[i : i + 3]) for i in range(0, len(ids), 3)]
        deltas.append(detokenizer.finish())
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
        assert not any(REPLACEMENT in d for d in deltas)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_split_character_is_held_until_whole(tiny_tokenizer, name: str) -> None:
    tokenizer = tiny_tokenizer(name)
    ids = tokenizer.encode("a🫠", add_special_tokens=False)
    assert len(ids) == 4, "the emoji should span three byte-level tokens"
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push(token) for token in ids] == ["a", "", "", "🫠"]
    assert detokenizer.finish() == ""


def test_finish_releases_a_broken_tail(tiny_tokenizer) -> None:
    tokenizer = tiny_tokenizer("qwen")
    ids = tokenizer.encode("ok🫠", add_special_tokens=False)[:-1]  # the emoji cut short
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(detokenizer.push(token) for token in ids) == "ok"
    assert "ok" + detokenizer.finish() == tokenizer.decode(ids)


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call gets."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.sizes: list[int] = []

    def decode(self, ids: list[int], **kw: Any) -> str:
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kw)


def test_each_step_decodes_a_small_window(tiny_tokenizer) -> None:
    tokenizer = tiny_tokenizer("qwen")
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    counting = CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting)  # type: ignore[arg-type]
    text = "".join(stream(detokenizer, ids))
    assert text == tokenizer.decode(ids) and len(ids) > 1000
    assert max(counting.sizes) <= 8, "decode windows grow with the stream (O(n^2))"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_chat_template_ids_equal_transformers(tiny_tokenizer, name: str) -> None:
    tokenizer = tiny_tokenizer(name)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[1]}]
    expected = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert chat_prompt_ids(tokenizer, chat) == list(expected)
    no_prompt = chat_prompt_ids(
        tokenizer, chat, options=TemplateOptions(add_generation_prompt=False)
    )
    assert len(no_prompt) < len(expected)


def test_vllm_template_options_reach_the_template(tiny_tokenizer) -> None:
    """add_generation_prompt, continue_final_message and chat_template_kwargs render as
    transformers renders them (what vLLM passes on)."""
    tokenizer = tiny_tokenizer("qwen")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, the"}]
    go_on = TemplateOptions(add_generation_prompt=False, continue_final_message=True)
    expected = tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert tokenizer.decode(chat_prompt_ids(tokenizer, chat, options=go_on)) == expected
    assert expected.endswith("Sure, the")
    thinking = copy.deepcopy(tokenizer)
    thinking.chat_template = (
        "{% if enable_thinking is defined and not enable_thinking %}NO THINKING {% endif %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    quiet = TemplateOptions(kwargs={"enable_thinking": False})
    assert tokenizer.decode(chat_prompt_ids(thinking, chat[:1], options=quiet)) == "NO THINKING hi"
    assert tokenizer.decode(chat_prompt_ids(thinking, chat[:1])) == "hi"


def test_developer_messages_are_system_ones_to_a_template_without_that_role(
    tiny_tokenizer,
) -> None:
    """vLLM's rule: OpenAI's developer role becomes system, all system messages merged first,
    unless the template names the role itself."""
    tokenizer = tiny_tokenizer("qwen")
    user = {"role": "user", "content": "hi"}
    as_system = chat_prompt_ids(tokenizer, [{"role": "system", "content": "Be brief."}, user])
    developer = [{"role": "developer", "content": "Be brief."}, user]
    assert chat_prompt_ids(tokenizer, developer) == as_system
    both = [{"role": "system", "content": "A"}, user, {"role": "developer", "content": "B"}]
    merged = [{"role": "system", "content": "A\n\nB"}, user]
    assert chat_prompt_ids(tokenizer, both) == chat_prompt_ids(tokenizer, merged)
    knows = copy.deepcopy(tokenizer)
    knows.chat_template = "{% for m in messages %}{{ m.role == 'developer' }}{% endfor %}"
    assert tokenizer.decode(chat_prompt_ids(knows, developer)) == "TrueFalse"


def test_load_tokenizer_equals_auto_tokenizer(make_tiny, tiny_tokenizer) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = make_tiny("llama", tokenizer="deepseek")
    ours = tiny_tokenizer("deepseek")
    assert isinstance(ours, PreTrainedTokenizerFast)
    auto = AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        assert ours(text).input_ids == auto(text).input_ids


@pytest.mark.parametrize(("name", "expected"), [("qwen", {151643, 151645}), ("deepseek", {1})])
def test_eos_token_ids(make_tiny, tiny_tokenizer, name: str, expected: set[int]) -> None:
    path = make_tiny("llama", tokenizer=name)
    assert eos_token_ids(path, tiny_tokenizer(name)) == expected


def test_eos_token_ids_fall_back_to_config_json(make_tiny, tiny_tokenizer, tmp_path: Path) -> None:
    source = make_tiny("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["eos_token_id"] = [7, 8]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert eos_token_ids(tmp_path, tiny_tokenizer("qwen")) == {7, 8, 151645}


def test_missing_tokenizer_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make-model"):
        load_tokenizer(tmp_path)


def test_missing_chat_template_names_the_fix() -> None:
    tokenizer = SimpleNamespace(chat_template=None, name_or_path="base-model")
    with pytest.raises(ApiError, match="no chat template") as info:
        chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert info.value.status == 400 and "/v1/completions" in info.value.message


@pytest.mark.parametrize(
    "template",
    [
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}",
        "{% for m in messages %}{{ m.content + m.missing }}{% endfor %}",  # undefined field
        "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}",  # a type error
    ],
)
def test_what_the_chat_template_cannot_render_is_a_400(tiny_tokenizer, template: str) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer("qwen"))
    tokenizer.chat_template = template
    with pytest.raises(ApiError, match="cannot render these messages") as info:
        chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert info.value.status == 400 and info.value.param == "messages"
