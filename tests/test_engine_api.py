"""The offline API and CLI: checkpoint variants, tokenization, sampling through the engine,
and bad input that must fail with an error naming the fix."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig
from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.tokenizer import load_tokenizer
from tests.test_engine_oracle import (
    GREEDY,
    assert_matches_hf,
    assert_pages_released,
    new_llm,
    random_prompts,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "kw",
    [
        {"tie_word_embeddings": True},
        {"rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 1024},
        {"max_shard_bytes": 2_000_000},  # several safetensors shards and an index
    ],
    ids=["tied", "llama3-rope", "sharded"],
)
def test_llama_variants_match_transformers(make_tiny, kw) -> None:
    path = make_tiny("llama", **kw)
    if "max_shard_bytes" in kw:
        assert (path / "model.safetensors.index.json").is_file()
    llm = new_llm(path)
    prompts = [[5, 6, 7], list(range(100, 190)), list(range(1000, 1100, 3))]
    assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))
    assert_pages_released(llm)


def test_transformers_v4_config_keys(make_tiny, tmp_path) -> None:
    src = make_tiny("qwen2")
    v4 = tmp_path / "v4"
    shutil.copytree(src, v4)
    cfg = json.loads((v4 / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (v4 / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.load(v4).rope_theta == ModelConfig.load(src).rope_theta
    prompts = [list(range(10, 50))]
    a = new_llm(src).generate(prompts, GREEDY)
    b = new_llm(v4).generate(prompts, GREEDY)
    assert a[0].token_ids == b[0].token_ids


def test_text_prompts_tokenized_like_autotokenizer(make_tiny) -> None:
    from transformers import AutoTokenizer

    path = make_tiny("qwen3")
    llm = new_llm(path)
    texts = ["Hello, world!", "  spaces  and\ttabs\n", "日本語とemoji 🎉", "x"]
    reference = AutoTokenizer.from_pretrained(path)
    for text in texts:
        assert llm.encode(text) == reference(text)["input_ids"]
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for out in outs:
        assert out.text == reference.decode(out.token_ids, skip_special_tokens=True)


def test_seed_reproduces_and_batch_does_not_matter(make_tiny) -> None:
    llm = new_llm(make_tiny("llama"))
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate("Once upon a time", params)[0].token_ids
    mixed = llm.generate(["other prompt", "Once upon a time", "more"], params)[1].token_ids
    assert alone == mixed
    other = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=10, ignore_eos=True)
    assert llm.generate("Once upon a time", other)[0].token_ids != alone
    assert_pages_released(llm)


def test_stop_string_cuts_text_exactly(make_tiny) -> None:
    llm = new_llm(make_tiny("llama"))
    full = llm.generate("A stop test", SamplingParams(temperature=0, max_tokens=12))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate("A stop test", SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.matched_stop == stop
    assert cut.text == full.text[: full.text.index(stop)]
    assert_pages_released(llm)


def test_stop_token_ids_and_logprobs(make_tiny) -> None:
    llm = new_llm(make_tiny("qwen3"))
    full = llm.generate("abc", SamplingParams(temperature=0, max_tokens=8, logprobs=3))[0]
    assert len(full.logprobs) == len(full.token_ids)
    for chosen, top in zip(full.logprobs, full.top_logprobs):
        assert len(top) == 3 and top[0][1] == pytest.approx(chosen, abs=1e-5)
    stop_id = full.token_ids[2]
    cut = llm.generate("abc", SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]))
    assert cut[0].token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert cut[0].finish_reason == "stop"


def test_cli_generate_json(make_tiny) -> None:
    path = make_tiny("qwen2")
    cmd = [sys.executable, "-m", "cluster.cli", "generate", "--model", str(path)]
    cmd += ["--prompt", "Hello", "--prompt", "The sky is", "--max-tokens", "5", "--json"]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2
    llm = new_llm(path)
    expected = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=5))
    for rec, exp in zip(records, expected):
        assert set(rec) == {"text", "token_ids", "finish_reason"}
        assert rec["token_ids"] == exp.token_ids and rec["text"] == exp.text
        assert rec["finish_reason"] in ("stop", "length")


def test_cli_generate_text_marks_where_each_prompts_output_ends(make_tiny) -> None:
    path = make_tiny("qwen2")
    cmd = [sys.executable, "-m", "cluster.cli", "generate", "--model", str(path)]
    cmd += ["--max-tokens", "5", "--prompt", "Hello"]
    one = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    cmd += ["--prompt", "The sky\nis"]
    two = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    expected = new_llm(path).generate(
        ["Hello", "The sky\nis"], SamplingParams(temperature=0, max_tokens=5)
    )
    assert one == expected[0].text + "\n"
    assert two.splitlines() == [
        "Prompt: 'Hello'",
        f"Output: {expected[0].text!r}",
        "Prompt: 'The sky\\nis'",
        f"Output: {expected[1].text!r}",
    ]


# ---- bad input --------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(make_tiny, tmp_path) -> None:
    path = _copy(make_tiny("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    cfg["model_type"] = "fancy"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture.*supports"):
        LLM(str(path))


def test_missing_weights(make_tiny, tmp_path) -> None:
    path = _copy(make_tiny("llama"), tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model weights"):
        LLM(str(path))


def test_missing_config(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*make-model"):
        LLM(str(tmp_path))


def test_missing_model_directory_is_named_as_such(tmp_path, monkeypatch) -> None:
    """A path with no directory at all is not "a directory without config.json"; a relative
    one says what it was relative to."""
    with pytest.raises(FileNotFoundError, match=r"no model directory at .*/gone: point"):
        LLM(str(tmp_path / "gone"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"at rel/dir \(relative to {tmp_path}\)"):
        load_tokenizer("rel/dir")


def test_incomplete_and_misshapen_weights(make_tiny, tmp_path) -> None:
    path = _copy(make_tiny("llama"), tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    bad = dict(tensors)
    bad[name] = torch.zeros(3, 3)
    save_file(bad, path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{name}.*shape \(3, 3\)"):
        LLM(str(path))
    del bad[name]
    save_file(bad, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 weights.*down_proj"):
        LLM(str(path))


@pytest.fixture(scope="module")
def small_llm(make_tiny) -> LLM:
    return new_llm(make_tiny("llama", max_position_embeddings=128))


def test_empty_prompt(small_llm) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        small_llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="prompt is empty"):
        small_llm.generate("", GREEDY)


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_bad_max_tokens(small_llm, max_tokens) -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        small_llm.generate("hi", SamplingParams(max_tokens=max_tokens))


def test_prompt_longer_than_context(small_llm) -> None:
    with pytest.raises(ValueError, match="prompt has 200 tokens but the model's context is 128"):
        small_llm.generate([list(range(200))], GREEDY)
    assert_pages_released(small_llm)  # nothing leaked by the refused request


def test_generation_stops_at_context_end(small_llm) -> None:
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    out = small_llm.generate([list(range(120))], params)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert_pages_released(small_llm)


def test_logit_bias_steers_greedy_through_the_argmax_path(make_tiny) -> None:
    """Without keep_logits, plain greedy steps take the argmax of the LM head alone: a request
    with a logit_bias must not (the bias would be lost)."""
    llm = LLM(str(make_tiny("llama")), dtype="float32", page_size=4, max_total_tokens=2048)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = llm.generate("Tell me", greedy)[0].token_ids
    forced_id = next(t for t in range(1000, 2000) if t not in plain)
    forced = dataclasses.replace(greedy, logit_bias={str(forced_id): 100})
    assert llm.generate("Tell me", forced)[0].token_ids == [forced_id] * 6
    banned = dataclasses.replace(greedy, logit_bias={str(plain[0]): -100})
    assert llm.generate("Tell me", banned)[0].token_ids[0] != plain[0]
    # batched beside an unbiased greedy request, each keeps its own
    both = llm.generate(["Tell me", "Tell me"], [greedy, forced])
    assert [o.token_ids for o in both] == [plain, [forced_id] * 6]
    with pytest.raises(ValueError, match="logit_bias must name token ids"):
        llm.generate("Tell me", dataclasses.replace(greedy, logit_bias={"10000000": 1}))
    assert_pages_released(llm)


def test_abort_frees_a_request_pages_once_wherever_it_is(make_tiny) -> None:
    """Engine.abort of a waiting, a running (mid-decode) and a reserved request, and of ids it
    does not know: each request's pages go back exactly once, and a request decoding beside
    them is not disturbed."""
    path = make_tiny("llama")
    llm = new_llm(path)
    engine, sched = llm.engine, llm.engine.scheduler
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    doomed, survivor, queued, held = random_prompts([41, 23, 30, 17], len(llm.tokenizer), seed=9)
    alone = new_llm(path).generate([survivor], params)[0].token_ids

    engine.add_request("doomed", doomed, params)
    engine.add_request("survivor", survivor, params)
    outs: dict[str, list[int]] = {"doomed": [], "survivor": []}
    while len(outs["doomed"]) < 6:  # both are mid-decode, the doomed one's prompt is cached
        for out in engine.step():
            outs[out.rid] += out.new_token_ids
    engine.add_request("queued", queued, params)  # waits: no step has run since
    assert engine.reserve("held", held, params, headroom=8) is not None
    assert [r.rid for r in sched.waiting] == ["queued"] and not sched.find("queued").page_table

    free = engine.num_free_pages
    assert engine.abort("queued") and sched.find("queued") is None
    assert engine.num_free_pages == free  # it held nothing
    engine.check_integrity()

    req = sched.find("doomed")
    assert req in sched.running and req.num_tree_pages > 0 and req.own_pages
    free += len(req.page_table)
    assert engine.abort("doomed") and sched.find("doomed") is None
    # its own pages back in the pool, its cached prompt pages unlocked (evictable): all free
    assert engine.num_free_pages == free
    engine.check_integrity()

    free += len(sched.held["held"].page_table)
    assert engine.abort("held") and "held" not in sched.held
    assert engine.num_free_pages == free
    engine.check_integrity()

    before = (engine.pool.num_free, engine.num_free_pages)
    for rid in ("doomed", "queued", "held", "never-sent"):  # gone or unknown: nothing to free
        assert engine.abort(rid) is False
    assert (engine.pool.num_free, engine.num_free_pages) == before
    engine.check_integrity()

    while engine.has_work():
        for out in engine.step():
            assert out.rid == "survivor"
            outs[out.rid] += out.new_token_ids
    assert outs["survivor"] == alone
    assert_pages_released(llm)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_models_are_built_in_their_dtype_before_any_weight_loads(make_tiny, monkeypatch, arch):
    """A bf16 engine makes its parameters bf16 from the start (a float32 build cast after the
    load holds twice the bytes on a GPU), except what stays float32 by design (the MoE
    correction bias), and torch's default dtype is back to float32 after."""
    from engine import runner
    from engine.models import model_class

    path = make_tiny(arch, "deepseek" if arch == "deepseek_v3" else "qwen")
    cls = model_class(ModelConfig.load(path))
    built: dict[str, torch.dtype] = {}
    load = cls.load_weights

    def record(self, weights):
        built.update({name: p.dtype for name, p in self.named_parameters()})
        return load(self, weights)

    monkeypatch.setattr(cls, "load_weights", record)
    model = runner.load_model(ModelConfig.load(path), str(path), torch.bfloat16, "cpu")
    fp32 = {n for n in built if n.endswith("e_score_correction_bias")}
    assert built and {built[n] for n in set(built) - fp32} == {torch.bfloat16}
    assert {built[n] for n in fp32} <= {torch.float32}
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32
