"""1P1D through `pdserve launch`, with each transfer backend, driven by the `openai` client.

The gateway pairs each request with the prefill and the decode node; the KV pages cross
processes through Mooncake, NIXL or NCCL (gloo on CPU). Outputs must equal transformers' greedy output: the token
ids (random weights often decode to U+FFFD, so different ids can make equal text), which the
native /generate returns, and the text every API returns. Requests for their prompt's logprobs
(lm-eval-harness's echo with logprobs, vLLM's prompt_logprobs, SGLang's logprob_start_len) are
prefilled by the decode node alone, and match transformers' log_softmax at every position.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from engine.tokenizer import load_tokenizer
from tests.e2e.cluster_util import Cluster, cluster_yaml, free_ports, launched, make_load
from tests.e2e.logprob_oracle import (
    assert_echo_logprobs,
    assert_sglang_input_logprobs,
    assert_vllm_prompt_logprobs,
)
from tests.test_engine_oracle import MAX_NEW, hf_reference

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A prefill/decode disaggregated cluster moves KV pages between nodes: " * 6,
    "日本語のテキストと emoji 🎉 mixed in",
]
GREEDY = {"temperature": 0, "max_tokens": MAX_NEW, "extra_body": {"ignore_eos": True}}
# NOTE: a context far longer than the checkpoint's 4096, so that a request of UNFINISHABLE
# tokens cannot end on its own within any wait here (minutes of decoding): only an abort ends it.
CONTEXT = 65536
UNFINISHABLE = CONTEXT - 1024


@pytest.fixture(scope="module", params=["mooncake", "nixl", "nccl"])
def cluster(request, make_tiny, tmp_path_factory) -> Cluster:
    model = make_tiny("qwen3")
    config = cluster_yaml(model, request.param, prefill=1, decode=1)
    config["engine"].update(max_model_len=CONTEXT, max_total_tokens=CONTEXT)
    with launched(config, tmp_path_factory.mktemp(f"pd-{request.param}")) as c:
        c.model = model
        yield c


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)


def expected_text(model: Path, ids: list[int]) -> tuple[str, int]:
    tokens, _ = hf_reference(str(model), tuple(ids))
    return load_tokenizer(model).decode(tokens, skip_special_tokens=True), len(tokens)


def expected_ids(model: Path, ids: list[int]) -> list[int]:
    """transformers' greedy continuation of `ids`: MAX_NEW token ids."""
    return hf_reference(str(model), tuple(ids))[0]


def generate_params(max_new: int) -> dict:
    return {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}


def generate(url: str, prompt: str | list[int], max_new: int = MAX_NEW) -> dict:
    """Greedy native /generate of a text or token-id prompt: {"text", "output_ids", ...}."""
    key = "text" if isinstance(prompt, str) else "input_ids"
    body = {key: prompt, "sampling_params": generate_params(max_new)}
    answer = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_completions_and_chat_equal_transformers(cluster: Cluster) -> None:
    tok = load_tokenizer(cluster.model)
    api = client(cluster)
    for prompt in PROMPTS:
        out = api.completions.create(model="tiny", prompt=prompt, **GREEDY)
        text, n = expected_text(cluster.model, tok(prompt)["input_ids"])
        native = generate(cluster.url, prompt)
        assert native["output_ids"] == expected_ids(cluster.model, tok(prompt)["input_ids"])
        assert out.choices[0].text == native["text"] == text
        assert out.usage.completion_tokens == n == MAX_NEW
        assert out.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    messages = [{"role": "user", "content": "Tell me about disaggregated serving."}]
    chat = api.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    native = generate(cluster.url, ids)
    assert native["output_ids"] == expected_ids(cluster.model, ids)
    assert chat.choices[0].message.content == native["text"] == expected_text(cluster.model, ids)[0]
    assert chat.usage.prompt_tokens == len(ids)


def test_stream_equals_non_stream_with_usage(cluster: Cluster) -> None:
    api = client(cluster)
    prompt = PROMPTS[2]
    whole = api.completions.create(model="tiny", prompt=prompt, **GREEDY)
    chunks = list(
        api.completions.create(
            model="tiny",
            prompt=prompt,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    native = {"text": prompt, "sampling_params": generate_params(MAX_NEW), "stream": True}
    with httpx.stream("POST", f"{cluster.url}/generate", json=native, timeout=120) as r:
        last = [line for line in r.iter_lines() if line.startswith("data: {")][-1]
    native_whole = generate(cluster.url, prompt)  # and as token ids, which text can hide
    assert json.loads(last[6:])["output_ids"] == native_whole["output_ids"]
    assert json.loads(last[6:])["text"] == native_whole["text"] == text
    assert chunks[-1].usage.completion_tokens == MAX_NEW
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    messages = [{"role": "user", "content": "stream me"}]
    chat_whole = api.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    chat_stream = api.chat.completions.create(
        model="tiny", messages=messages, stream=True, **GREEDY
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices)
    assert streamed == chat_whole.choices[0].message.content


def test_32_concurrent_requests_of_mixed_lengths(cluster: Cluster) -> None:
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    prompts = [("word " * (1 + 7 * i)) + f"number {i}" for i in range(32)]
    api = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)

    native = httpx.AsyncClient(base_url=cluster.url, timeout=120)
    sampling = generate_params(MAX_NEW)

    async def one(prompt: str) -> tuple[str, list[int], str]:
        out = await api.completions.create(model="tiny", prompt=prompt, **GREEDY)
        r = await native.post("/generate", json={"text": prompt, "sampling_params": sampling})
        assert r.status_code == 200, r.text
        return out.choices[0].text, r.json()["output_ids"], r.json()["text"]

    async def run_all() -> list[tuple[str, list[int], str]]:
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await api.close()
            await native.aclose()

    got = asyncio.run(run_all())
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    local = LLM(str(cluster.model), dtype="float32", max_total_tokens=16384)
    assert got == [(o.text, o.token_ids, o.text) for o in local.generate(prompts, params)]


def test_repeated_prefix_hits_the_prefill_cache(cluster: Cluster) -> None:
    api = client(cluster)
    shared = "This long shared system preamble is the same for every request. " * 8
    first = api.completions.create(model="tiny", prompt=shared + "Question one?", **GREEDY)
    second = api.completions.create(model="tiny", prompt=shared + "Question two?", **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 64


def test_bad_request_is_an_openai_error(cluster: Cluster) -> None:
    api = client(cluster)
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert "max_tokens" in str(err.value)
    too_long = "word " * (CONTEXT + 1000)
    with pytest.raises(openai.BadRequestError, match="context"):
        api.completions.create(model="tiny", prompt=too_long, max_tokens=4)


def test_client_disconnect_aborts_on_both_nodes(cluster: Cluster) -> None:
    body = {
        "model": "tiny",
        "prompt": "never ending " * 20,
        "max_tokens": UNFINISHABLE,
        "ignore_eos": True,
        "stream": True,
    }
    decode = cluster.node_urls()[-1]
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert httpx.get(f"{decode}/get_server_info", timeout=10).json()["running"] == 1
    # Closed mid-stream: both nodes must drop the request and its pages. UNFINISHABLE tokens
    # take minutes at this model's speed, so only an abort frees the pages in time.
    cluster.wait_pages_free(timeout_s=5)


def test_pages_all_free_after_load(cluster: Cluster) -> None:
    make_load(cluster)  # its dropped stream can only end by an abort (UNFINISHABLE tokens)
    infos = cluster.wait_pages_free()
    assert {i["role"] for i in infos} == {"prefill", "decode"}
    for url, info in zip(cluster.node_urls(), infos):
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        free = re.search(r"^pdserve_node_free_pages\{[^}]*\} (\d+)$", metrics, re.M)
        assert free and int(free.group(1)) == info["total_pages"]
        # both sides count the load's KV transfers: rooms, bytes, each room's time
        rooms = dict(re.findall(
            r'^pdserve_node_transfer_rooms_total\{[^}]*state="(\w+)"\} (\d+)$', metrics, re.M
        ))  # fmt: skip
        moved = re.search(r"^pdserve_node_transfer_bytes_total\{[^}]*\} (\d+)$", metrics, re.M)
        timed = re.search(r"^pdserve_node_transfer_seconds_count\{[^}]*\} (\d+)$", metrics, re.M)
        assert rooms and moved and timed, metrics
        assert int(rooms["success"]) > 0 and int(moved.group(1)) > 0, metrics
        # a room is timed when it moved bytes: every success, and failures that got that far
        ended = sum(int(n) for n in rooms.values())
        assert int(rooms["success"]) <= int(timed.group(1)) <= ended, metrics


def test_sglang_router_drives_our_nodes_unchanged(cluster: Cluster) -> None:
    """SGLang's own router in --pd-disaggregation mode in front of our 1P1D."""
    pytest.importorskip("sglang_router")
    from tests.e2e.test_2p2d_policies import wait_healthy

    port, metrics_port = free_ports(2)
    prefill, decode = cluster.config["prefill"][0], cluster.config["decode"][0]
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation"]
    # NOTE: its metrics port too (29000 by default): test sessions on one machine run at once
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    argv += ["--prefill", f"http://127.0.0.1:{prefill['port']}", str(prefill["bootstrap_port"])]
    argv += ["--decode", f"http://127.0.0.1:{decode['port']}", "--host", "127.0.0.1"]
    argv += ["--port", str(port)]
    cluster.extra.append(
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    )
    # NOTE: /readiness, not /health: the router answers /health at once, and 503s requests
    # ("No decode workers available") until its own checks find the workers healthy
    url = wait_healthy(f"http://127.0.0.1:{port}", "sglang router", path="/readiness")
    tok = load_tokenizer(cluster.model)
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    prompt = PROMPTS[1]
    out = api.completions.create(model="tiny", prompt=prompt, **GREEDY)
    assert out.choices[0].text == expected_text(cluster.model, tok(prompt)["input_ids"])[0]
    native = generate(url, prompt)
    assert native["output_ids"] == expected_ids(cluster.model, tok(prompt)["input_ids"])
    assert native["text"] == out.choices[0].text
    assert native["meta_info"]["completion_tokens"] == MAX_NEW


def ttft_histogram(url: str) -> tuple[float, int]:
    """(sum of seconds, count) of the gateway's time-to-first-token histogram."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = re.search(r"^\w+_time_to_first_token_seconds_sum (\S+)$", text, re.M)
    count = re.search(r"^\w+_time_to_first_token_seconds_count (\S+)$", text, re.M)
    assert total and count, "the gateway exports no TTFT histogram"
    return float(total.group(1)), int(float(count.group(1)))


def test_bench_ttft_agrees_with_the_gateways_own(cluster: Cluster, tmp_path: Path) -> None:
    """`pdserve bench` and the gateway time the same first tokens: over one run the gateway
    counts every request in its TTFT histogram, and the two means agree (the client's adds
    only its own loopback HTTP)."""
    before = ttft_histogram(cluster.url)
    out = tmp_path / "run.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "bench", "--backend", "sglang-oai",
         "--base-url", f"{cluster.url}/v1", "--dataset-name", "random", "--num-prompts", "12",
         "--random-input-len", "48", "--random-output-len", "8", "--random-range-ratio", "1",
         "--max-concurrency", "4", "--warmup-requests", "0", "--disable-tqdm",
         "--output-file", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[-1])
    after = ttft_histogram(cluster.url)
    assert record["completed"] == 12 and after[1] - before[1] == 12
    gateway_ms = (after[0] - before[0]) / 12 * 1000
    bench_ms = record["mean_ttft_ms"]
    assert bench_ms >= gateway_ms * 0.9, (bench_ms, gateway_ms)  # the client's clock starts first
    # NOTE: the same requests measured twice; the client's share (its event loop, on 2 busy
    # cores) reached 71 ms over the gateway's 79 in CI, so the bound is loose
    assert bench_ms - gateway_ms <= max(150.0, gateway_ms), (bench_ms, gateway_ms)


# ---- prompt logprobs: every such request is prefilled by its decode node ----


def prefill_requests(cluster: Cluster) -> int:
    """Generation requests the prefill node has answered (its /metrics)."""
    text = httpx.get(f"{cluster.node_urls()[0]}/metrics", timeout=10).text
    found = re.findall(r"^pdserve_node_requests_total\{.*\} (\d+)$", text, re.M)
    return sum(int(n) for n in found)


def test_echo_logprobs_score_prompts_as_transformers(cluster: Cluster) -> None:
    """lm-eval-harness's loglikelihood request (echo, logprobs, max_tokens 1) through the
    gateway: the prompt's logprobs and the next token's; a batch of token-id prompts with n=2
    too. The prefill node never sees them."""
    tok, api = load_tokenizer(cluster.model), client(cluster)
    before = prefill_requests(cluster)
    lm_eval = {"max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    for prompt in PROMPTS[:3]:
        choice = api.completions.create(model="tiny", prompt=prompt, **lm_eval).choices[0]
        ids = tok(prompt)["input_ids"]
        assert choice.text.startswith(prompt)
        assert_echo_logprobs(cluster.model, ids, choice.logprobs, top=1)
        assert_vllm_prompt_logprobs(cluster.model, ids, choice.prompt_logprobs, top=1)
    batch = [tok(p)["input_ids"] for p in PROMPTS[1:3]]
    out = api.completions.create(
        model="tiny", prompt=batch, n=2, max_tokens=2, temperature=0, logprobs=0, echo=True
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert_echo_logprobs(cluster.model, batch[c.index // 2], c.logprobs, top=0)
    assert prefill_requests(cluster) == before


def test_echo_logprobs_stream_lead_with_the_prompt(cluster: Cluster) -> None:
    """A stream's first chunk carries the echoed prompt and its logprobs (as vLLM's); the
    chunks add up to the whole answer."""
    api, prompt = client(cluster), PROMPTS[1]
    asked = {"max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}
    whole = api.completions.create(model="tiny", prompt=prompt, **asked).choices[0].logprobs
    chunks = list(api.completions.create(model="tiny", prompt=prompt, stream=True, **asked))
    first = chunks[0].choices[0]
    assert first.text.startswith(prompt) and first.logprobs.token_logprobs[0] is None
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [o for p in parts for o in p.text_offset] == whole.text_offset
    streamed = [lp for p in parts for lp in p.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(whole.token_logprobs[1:])


def test_prompt_logprobs_of_chat_and_generate(cluster: Cluster) -> None:
    """vLLM's prompt_logprobs on a chat (beside the choices), SGLang's input logprobs from
    logprob_start_len on; a start past the prompt is a 400."""
    tok, api = load_tokenizer(cluster.model), client(cluster)
    messages = [{"role": "user", "content": "Score this prompt."}]
    chat = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert_vllm_prompt_logprobs(cluster.model, ids, chat.prompt_logprobs, top=2)
    ids = tok(PROMPTS[2])["input_ids"]
    body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 3,
            "top_logprobs_num": 2, "return_text_in_logprobs": True,
            "sampling_params": generate_params(2)}  # fmt: skip
    answer = httpx.post(f"{cluster.url}/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert_sglang_input_logprobs(cluster.model, ids, answer.json()["meta_info"], 3, top=2)
    past = httpx.post(
        f"{cluster.url}/generate", json={**body, "logprob_start_len": len(ids) + 1}, timeout=60
    )
    assert past.status_code == 400 and past.json()["error"]["param"] == "logprob_start_len"


def test_a_pd_request_for_prompt_logprobs_is_prefilled_by_its_decode_node(
    cluster: Cluster,
) -> None:
    """Sent to both nodes with bootstrap fields, as SGLang's router sends it: the decode node
    declines the room and prefills it, the prefill node drops it."""
    prefill, decode = cluster.node_urls()[0], cluster.node_urls()[-1]
    ids = load_tokenizer(cluster.model)(PROMPTS[1])["input_ids"]
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1,
            "echo": True, "bootstrap_host": "127.0.0.1", "rid": "plp-pd",
            "bootstrap_port": cluster.config["prefill"][0]["bootstrap_port"],
            "bootstrap_room": random.getrandbits(63)}  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        answers = [
            pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=120)
            for url in (prefill, decode)
        ]
    dropped, answer = (a.result() for a in answers)
    assert dropped.status_code < 500 and answer.status_code == 200, answer.text
    # NOTE: the openai package's types say float, not null: its client reads them unvalidated
    logprobs = SimpleNamespace(**answer.json()["choices"][0]["logprobs"])
    assert_echo_logprobs(cluster.model, ids, logprobs, top=1)
    cluster.wait_pages_free()
