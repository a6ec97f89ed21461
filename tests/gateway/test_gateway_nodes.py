"""The gateway in front of real nodes (one prefill, one decode, started as `pdserve` processes),
driven by the `openai` client: colocated (decode only) and 1P1D through the same decode node."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from api.settings import GatewaySettings, Instance
from gateway.app import create_app
from tests.ports import free_port

from .servers import ServerThread, wait_until

NODE_START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 20.0
# NOTE: a context far longer than the checkpoint's, so that a request of UNFINISHABLE tokens
# cannot end on its own within any wait of these tests: only an abort ends it.
CONTEXT = 131072
UNFINISHABLE = CONTEXT - 1024
ENGINE = ["--served-model-name", "tiny", "--engine-opt", f"max_total_tokens={CONTEXT}"]
ENGINE += ["--engine-opt", f"max_model_len={CONTEXT}"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
USER = {"role": "user", "content": "Hi"}


@dataclass
class Nodes:
    prefill: Instance
    decode: Instance
    colocated: ServerThread  # gateway -> decode
    pd: ServerThread  # gateway -> prefill + decode
    limited: ServerThread  # colocated, with an API key and limits
    logs: Path  # prefill.log and decode.log

    def client(self, gateway: ServerThread, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key=api_key, max_retries=0, timeout=60.0
        )


def start_node(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "cluster.cli", *args, *ENGINE]
    # NOTE: a session of its own, so that stopping it reaches its scheduler process too
    return subprocess.Popen(
        command, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_nodes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each node, then SIGKILL whatever is left of its process group."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"node exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    try:
        return httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def nodes(
    make_tiny: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nodes]:
    model, logs = str(make_tiny("llama")), tmp_path_factory.mktemp("node-logs")
    pp, bp, dp = free_port(), free_port(), free_port()
    prefill = Instance(f"http://127.0.0.1:{pp}", bp)
    decode = Instance(f"http://127.0.0.1:{dp}")
    procs = [
        (prefill.url, start_node(["prefill", "--model", model, "--port", str(pp),
                                  "--bootstrap-port", str(bp)], logs / "prefill.log"),
         logs / "prefill.log"),
        (decode.url, start_node(["decode", "--model", model, "--port", str(dp)],
                                logs / "decode.log"), logs / "decode.log"),
    ]  # fmt: skip
    gateways: list[ServerThread] = []
    try:
        wait_until(
            lambda: all([healthy(*node) for node in procs]), NODE_START_TIMEOUT_S, "both nodes"
        )
        settings = [
            GatewaySettings(decode=(decode,)),
            GatewaySettings(prefill=(prefill,), decode=(decode,)),
            GatewaySettings(decode=(decode,), api_key="sk-key", max_tokens_limit=32),
        ]
        gateways = [ServerThread(create_app(s)).start() for s in settings]
        yield Nodes(prefill, decode, *gateways, logs)
    finally:
        for gateway in gateways:
            gateway.stop()
        stop_nodes([proc for _, proc, _ in procs])


@pytest.fixture(params=["colocated", "pd"])
def gateway(request: pytest.FixtureRequest, nodes: Nodes) -> ServerThread:
    return getattr(nodes, request.param)


def test_models(nodes: Nodes) -> None:
    assert [m.id for m in nodes.client(nodes.pd).models.list().data] == ["tiny"]


def test_completion_stream_equals_whole(nodes: Nodes, gateway: ServerThread) -> None:
    client = nodes.client(gateway)
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.prompt_tokens_details is not None
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_pd_and_colocated_agree(nodes: Nodes) -> None:
    def greedy(gateway: ServerThread) -> str:
        answer = nodes.client(gateway).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say something."}],
            max_completion_tokens=10, temperature=0,
        )  # fmt: skip
        return answer.choices[0].message.content

    assert greedy(nodes.pd) == greedy(nodes.colocated)

    def greedy_ids(gateway: ServerThread) -> list[int]:  # equal text can hide different ids
        params = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
        body = {"text": PROMPT, "sampling_params": params}
        answer = httpx.post(f"{gateway.url}/generate", json=body, timeout=60.0, trust_env=False)
        return answer.json()["output_ids"]

    pd = greedy_ids(nodes.pd)
    assert len(pd) == 10 and pd == greedy_ids(nodes.colocated)


def test_chat_options(nodes: Nodes, gateway: ServerThread) -> None:
    client = nodes.client(gateway)
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, seed=7,
        temperature=1.0, logprobs=True, top_logprobs=2, stop=["\n\n\n"],
    )  # fmt: skip
    assert len(answer.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6


def n_samples(nodes: Nodes, gateway: ServerThread) -> None:
    answer = nodes.client(gateway).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, n=2, seed=7,
        temperature=1.0,
    )  # fmt: skip
    assert [c.index for c in answer.choices] == [0, 1]


def test_n_samples_colocated(nodes: Nodes) -> None:
    n_samples(nodes, nodes.colocated)


def test_n_samples_pd(nodes: Nodes) -> None:
    n_samples(nodes, nodes.pd)


def test_generate_passthrough(nodes: Nodes, gateway: ServerThread) -> None:
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
    with httpx.Client(base_url=gateway.url, timeout=60.0, trust_env=False) as c:
        answer = c.post("/generate", json=body, headers={"X-Request-Id": "gen-1"})
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "gen-1"
        assert answer.json()["meta_info"]["completion_tokens"] == 5
        with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2


def test_repeated_prefix_is_cached(nodes: Nodes) -> None:
    client = nodes.client(nodes.pd)
    prompt = "A long shared preamble about routing and caches. " * 8
    client.completions.create(model="tiny", prompt=prompt + "one", max_tokens=2)
    again = client.completions.create(model="tiny", prompt=prompt + "two", max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_errors_reach_the_client_in_openai_shape(nodes: Nodes) -> None:
    with pytest.raises(openai.AuthenticationError):
        nodes.client(nodes.limited, api_key="wrong").models.list()
    client = nodes.client(nodes.limited, api_key="sk-key")
    with pytest.raises(openai.BadRequestError, match="limit of 32"):
        client.completions.create(model="tiny", prompt="x", max_tokens=33)
    client.models.list()  # learns the served ids
    with pytest.raises(openai.NotFoundError, match="tiny"):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices


def server_info(instance: Instance) -> dict:
    return httpx.get(f"{instance.url}/get_server_info", timeout=5.0, trust_env=False).json()


def idle(instance: Instance) -> bool:
    """No request on the node and every page free."""
    info = server_info(instance)
    busy = info["running"] + info["waiting"] + info["held"]
    return busy == 0 and info["free_pages"] == info["total_pages"]


def test_disconnect_mid_stream_frees_pages_on_both_nodes(nodes: Nodes) -> None:
    client = nodes.client(nodes.pd)
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=UNFINISHABLE, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    next(iter(stream))
    assert server_info(nodes.decode)["running"] == 1  # decoding, and far from its end
    stream.close()
    # only an abort ends it in time: UNFINISHABLE tokens take minutes
    wait_until(lambda: idle(nodes.decode), 30.0, "decode drops the request and frees its pages")
    wait_until(lambda: idle(nodes.prefill), 30.0, "prefill pages freed")
    for node in (nodes.decode, nodes.prefill):
        answer = httpx.get(f"{node.url}/check_integrity", timeout=5.0, trust_env=False)
        assert (answer.status_code, answer.json()) == (200, {"ok": True})


def test_node_abort_request_ends_its_stream(nodes: Nodes) -> None:
    """POST /abort_request {"rid"} to a node: the node's own stream of that request ends with
    finish_reason abort, and its pages come back, while the client still listens."""
    rid = "abort-me"
    params = {"max_new_tokens": UNFINISHABLE, "temperature": 0, "ignore_eos": True}
    body = {"rid": rid, "text": PROMPT, "sampling_params": params, "stream": True}
    with (
        httpx.Client(base_url=nodes.decode.url, timeout=60.0, trust_env=False) as c,
        c.stream("POST", "/generate", json=body) as r,
    ):
        assert r.status_code == 200
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(next(lines)[6:])["meta_info"]["finish_reason"] is None
        assert server_info(nodes.decode)["running"] == 1
        answer = c.post("/abort_request", json={"rid": rid})
        assert answer.json() == {"rid": rid, "aborted": True}
        # NOTE: the stream is still open, so its end cannot be a disconnect's abort
        wait_until(lambda: idle(nodes.decode), 30.0, "the aborted request's pages freed")
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2][6:])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(last["output_ids"]) == last["meta_info"]["completion_tokens"] < UNFINISHABLE


def test_stream_chunks_carry_a_null_finish_reason_until_the_last(nodes: Nodes) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    body |= {"max_tokens": 5, "temperature": 0}
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        text = http.post(f"{nodes.pd.url}/v1/chat/completions", json=body).text
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert all("finish_reason" in c["choices"][0] for c in chunks)
    assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] == "length"


def test_bad_requests_are_400s_that_leave_no_traceback_on_the_nodes(nodes: Nodes) -> None:
    bad = [
        ("/generate", {"text": ""}, "text"),
        ("/generate", {"text": "", "stream": True}, "text"),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "", "stream": True}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 0}},
         "sampling_params.max_new_tokens"),
        ("/generate", {"text": "x", "sampling_params": {"ignore_eos": "maybe"}},
         "sampling_params.ignore_eos"),
        ("/generate", {"text": "x", "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]},
         "messages[0]"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
         "messages[0].content"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [USER], "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [USER], "ignore_eos": "maybe"},
         "ignore_eos"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [USER],
                                  "logit_bias": {"5": -101}}, "logit_bias"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [USER],
                                  "logit_bias": {"99999999": 1}}, None),  # past the vocabulary
        ("/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 2}, "best_of"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "prompt_logprobs": 21},
         "prompt_logprobs"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [USER], "stream": True,
                                  "prompt_logprobs": 1}, "prompt_logprobs"),
        ("/generate", {"text": "x", "return_logprob": True, "logprob_start_len": -2},
         "logprob_start_len"),
        ("/generate", {"text": "x", "return_logprob": True, "top_logprobs_num": 21},
         "top_logprobs_num"),
    ]  # fmt: skip
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        for route, body, param in bad:
            for url in (nodes.pd.url, nodes.decode.url):  # through the gateway, and direct
                answer = http.post(f"{url}{route}", json=body)
                assert answer.status_code == 400, (url, route, body, answer.text)
                error = answer.json()["error"]
                assert error["type"] == "invalid_request_error" and error["param"] == param
                assert error["code"] is None or isinstance(error["code"], str)
        # NOTE: a task whose exception nobody retrieved is reported when it is collected;
        # more requests through the same nodes give that a chance to happen before we look
        for _ in range(3):
            ok = http.post(f"{nodes.pd.url}/generate", json={"text": "hi"})
            assert ok.status_code == 200
    for log in ("prefill.log", "decode.log"):
        text = (nodes.logs / log).read_text(errors="replace")
        assert "Traceback" not in text and "never retrieved" not in text, text[-3000:]


def test_an_omitted_max_tokens_stays_within_the_gateway_limit(nodes: Nodes) -> None:
    """gateway.max_tokens_limit 32 (and a context of CONTEXT tokens): leaving max_tokens out,
    or sending null, gets at most 32 tokens, whatever the route's own default."""
    chat = {"model": "tiny", "messages": [USER], "temperature": 0, "ignore_eos": True}
    native = {"text": PROMPT, "sampling_params": {"temperature": 0, "ignore_eos": True}}
    headers = {"Authorization": "Bearer sk-key"}
    with httpx.Client(base_url=nodes.limited.url, headers=headers, timeout=60.0) as c:
        for body in (chat, {**chat, "max_tokens": None}, {**chat, "max_completion_tokens": None}):
            answer = c.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 32
        answer = c.post("/generate", json=native)
        assert answer.json()["meta_info"]["completion_tokens"] == 32  # not /generate's 128
        body = {"model": "tiny", "prompt": PROMPT, "ignore_eos": True}
        assert c.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 16
        too_many = c.post("/v1/chat/completions", json={**chat, "max_tokens": 33})
        assert too_many.status_code == 400 and "limit of 32" in too_many.text


def test_an_explicit_max_tokens_that_does_not_fit_the_context_is_a_400(
    nodes: Nodes, gateway: ServerThread
) -> None:
    """Not cut short to what fits: refused, in vLLM's words, by the node and through the
    gateway alike."""
    ids = [100] * (CONTEXT - 10)
    completion = {"model": "tiny", "prompt": ids, "max_tokens": 16}
    native = {"input_ids": ids, "sampling_params": {"max_new_tokens": 11}}
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        for url in (gateway.url, nodes.decode.url):
            answer = http.post(f"{url}/v1/completions", json=completion)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
            assert error["message"].startswith(
                f"This model's maximum context length is {CONTEXT} tokens. However, you "
                f"requested {CONTEXT + 6} tokens ({CONTEXT - 10} in the prompt, 16 in the "
                "completion)."
            )
            answer = http.post(f"{url}/generate", json=native)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["param"] == "sampling_params.max_new_tokens"


def test_a_prompt_that_fills_the_context_is_a_400_naming_the_prompt(
    nodes: Nodes, gateway: ServerThread
) -> None:
    """With max_tokens or without: the prompt is what to shorten (vLLM says so too), not
    max_tokens; the node's check, relayed by the gateway."""
    ids = [100] * CONTEXT
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        for url in (gateway.url, nodes.decode.url):
            for extra in ({"max_tokens": 4}, {}):
                body = {"model": "tiny", "prompt": ids, **extra}
                answer = http.post(f"{url}/v1/completions", json=body)
                assert answer.status_code == 400, answer.text
                error = answer.json()["error"]
                assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
                assert f"there are {CONTEXT} tokens in the prompt" in error["message"]


def test_a_node_refuses_a_model_it_does_not_serve(nodes: Nodes) -> None:
    """As vLLM and the gateway do: 404 model_not_found naming the served model (it took any)."""
    bodies = {
        "/v1/completions": {"model": "no-such-model", "prompt": "x", "max_tokens": 1},
        "/v1/chat/completions": {"model": "no-such-model", "messages": [USER], "max_tokens": 1},
    }
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        for route, body in bodies.items():
            answer = http.post(f"{nodes.decode.url}{route}", json=body)
            assert answer.status_code == 404, answer.text
            error = answer.json()["error"]
            assert (error["param"], error["code"]) == ("model", "model_not_found")
            assert "serves: tiny" in error["message"]


def test_vllm_chat_template_fields_render_the_prompt(
    nodes: Nodes, gateway: ServerThread, tiny_tokenizer: Callable[[str], Any]
) -> None:
    """add_generation_prompt, continue_final_message and the developer role reach the template
    as vLLM passes them, on the node and through the gateway (they were left out)."""
    tokenizer = tiny_tokenizer("qwen")

    def rendered(messages: list[dict], **options: bool) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
        return len(tokenizer.encode(text, add_special_tokens=False))

    system = [{"role": "system", "content": "Be brief."}, USER]
    started = [USER, {"role": "assistant", "content": "Sure, the"}]
    cases = [
        ([USER], {}, rendered([USER], add_generation_prompt=True)),
        ([USER], {"add_generation_prompt": False}, rendered([USER])),
        (
            started,
            {"add_generation_prompt": False, "continue_final_message": True},
            rendered(started, continue_final_message=True),
        ),
        (
            [{**system[0], "role": "developer"}, USER],
            {},
            rendered(system, add_generation_prompt=True),
        ),
    ]
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        for url in (gateway.url, nodes.decode.url):
            for messages, fields, expected in cases:
                body = {"model": "tiny", "messages": messages, "max_tokens": 1, **fields}
                answer = http.post(f"{url}/v1/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
                assert answer.json()["usage"]["prompt_tokens"] == expected, (url, fields)


def test_continuous_usage_stats_put_each_choices_usage_on_its_chunks(
    nodes: Nodes, gateway: ServerThread
) -> None:
    """vLLM's stream_options.continuous_usage_stats: every chunk of a choice carries that
    choice's usage so far; the usage tail stays the whole request's."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    common = {"model": "tiny", "max_tokens": 4, "n": 2, "stream": True, "ignore_eos": True}
    bodies = {
        "/v1/chat/completions": {**common, "messages": [USER], "stream_options": options},
        "/v1/completions": {**common, "prompt": PROMPT, "stream_options": options},
    }
    with httpx.Client(base_url=gateway.url, timeout=60.0, trust_env=False) as http:
        for route, body in bodies.items():
            text = http.post(route, json=body).text
            chunks = [json.loads(line[6:]) for line in text.splitlines()
                      if line.startswith("data: {")]  # fmt: skip
            *steps, tail = chunks
            counts: dict[int, list[int]] = {0: [], 1: []}
            for chunk in steps:
                usage = chunk["usage"]
                assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
                counts[chunk["choices"][0]["index"]].append(usage["completion_tokens"])
            for seen in counts.values():
                assert seen == sorted(seen) and seen[-1] == 4, (route, counts)
            assert tail["choices"] == [] and tail["usage"]["completion_tokens"] == 8
            plain = {**body, "stream_options": {"include_usage": True}}
            lines = http.post(route, json=plain).text.splitlines()
            assert sum('"usage"' in line for line in lines) == 1  # the tail's alone


def test_logit_bias_steers_every_token_through_pd_and_colocated(
    nodes: Nodes, gateway: ServerThread, tiny_tokenizer: Callable[[str], Any]
) -> None:
    client = nodes.client(gateway)
    bias = {"777": 100}
    answer = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias=bias,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert answer.choices[0].text == tiny_tokenizer("qwen").decode([777] * 4)
    params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True, "logit_bias": bias}
    body = {"text": PROMPT, "sampling_params": params}
    answer = httpx.post(f"{gateway.url}/generate", json=body, timeout=60.0, trust_env=False)
    assert answer.json()["output_ids"] == [777] * 4


def test_echo_puts_the_prompt_before_each_choice(nodes: Nodes, gateway: ServerThread) -> None:
    client = nodes.client(gateway)
    greedy = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    plain = client.completions.create(prompt=PROMPT, **greedy).choices[0].text
    echoed = client.completions.create(prompt=[PROMPT, "Two"], echo=True, **greedy).choices
    assert echoed[0].text == PROMPT + plain and echoed[1].text.startswith("Two")
    chunks = list(client.completions.create(prompt=PROMPT, echo=True, stream=True, **greedy))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain


def test_streamed_text_offsets_run_on_as_in_the_whole_answer(
    nodes: Nodes, gateway: ServerThread
) -> None:
    client = nodes.client(gateway)
    greedy = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    whole = client.completions.create(**greedy).choices[0].logprobs
    chunks = list(client.completions.create(stream=True, **greedy))
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.text_offset and len(offsets) == 8
    assert offsets == sorted(offsets) and offsets[-1] > 0


def test_a_node_takes_a_plain_rid_and_refuses_one_no_header_can_carry(nodes: Nodes) -> None:
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        params = {"max_new_tokens": 2}
        ok = http.post(f"{nodes.decode.url}/generate",
                       json={"text": "hi", "rid": "my-req.1:a", "sampling_params": params})  # fmt: skip
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "my-req.1:a"
        for rid in ("caf\u00e9", "two words", "x" * 257, 7):
            bad = http.post(f"{nodes.decode.url}/generate",
                            json={"text": "hi", "rid": rid, "sampling_params": params})  # fmt: skip
            assert bad.status_code == 400, (rid, bad.text)
            assert bad.json()["error"]["param"] == "rid"


def test_a_node_refuses_native_prompts_of_the_wrong_type(nodes: Nodes) -> None:
    with httpx.Client(timeout=60.0, trust_env=False) as http:
        for body, param in [({"text": {"a": 1}}, "text"), ({"text": ["a", 3]}, "text"),
                            ({"input_ids": [1.5, 2]}, "input_ids"),
                            ({"input_ids": [[1], "x"]}, "input_ids")]:  # fmt: skip
            bad = http.post(f"{nodes.decode.url}/generate", json=body)
            assert bad.status_code == 400, (body, bad.text)
            assert bad.json()["error"]["param"] == param


def streamed_ids(text: str) -> list[int]:
    """The token ids a node's stream tagged its events with (`pd_token_ids`: `:ids 5,17`)."""
    lines = [
        line[5:].removesuffix(" end") for line in text.splitlines() if line.startswith(":ids ")
    ]
    return [int(t) for line in lines for t in line.split(",") if t]


def test_stop_reason_names_the_stop_token_as_vllm_does(nodes: Nodes) -> None:
    """vLLM's stop_reason: the stop token id that ended a choice, null for a length end (and
    on every chunk of a stream but the finishing one)."""
    greedy = {"model": "tiny", **{"temperature": 0, "max_tokens": 4, "ignore_eos": True}}
    requests = {
        "/v1/completions": {"prompt": PROMPT, **greedy},
        "/v1/chat/completions": {"messages": [USER], **greedy},
    }
    with httpx.Client(base_url=nodes.decode.url, timeout=60.0, trust_env=False) as http:
        for route, request in requests.items():
            tagged = http.post(route, json={**request, "stream": True, "pd_token_ids": True})
            ids = streamed_ids(tagged.text)
            assert len(ids) == 4, tagged.text
            plain = http.post(route, json=request).json()["choices"][0]
            assert (plain["finish_reason"], plain["stop_reason"]) == ("length", None)
            stops = {**request, "stop_token_ids": [ids[1]]}
            whole = http.post(route, json=stops).json()["choices"][0]
            assert (whole["finish_reason"], whole["stop_reason"]) == ("stop", ids[1]), route
            text = http.post(route, json={**stops, "stream": True}).text
            chunks = [json.loads(line[6:])["choices"] for line in text.splitlines()
                      if line.startswith("data: {")]  # fmt: skip
            ends = [(c[0]["finish_reason"], c[0]["stop_reason"]) for c in chunks if c]
            assert ends[-1] == ("stop", ids[1]) and set(ends[:-1]) == {(None, None)}, route


def test_tokenize_counts_what_generation_encodes(nodes: Nodes, gateway: ServerThread) -> None:
    """vLLM's /tokenize through the gateway: a prompt's and a chat's ids are those generation
    bills as prompt_tokens; /detokenize gives the text back; /version answers."""
    with httpx.Client(base_url=gateway.url, timeout=60.0, trust_env=False) as http:
        said = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
        direct = httpx.post(f"{nodes.decode.url}/tokenize", json={"prompt": PROMPT}).json()
        one = {"model": "tiny", "max_tokens": 1, "temperature": 0}
        billed = http.post("/v1/completions", json={**one, "prompt": PROMPT}).json()["usage"]
        chat = http.post("/tokenize", json={"model": "tiny", "messages": [USER]}).json()
        chat_billed = http.post("/v1/chat/completions", json={**one, "messages": [USER]}).json()
        bare = {"messages": [USER], "add_generation_prompt": False}
        without_prompt = http.post("/tokenize", json=bare).json()
        text = http.post("/detokenize", json={"tokens": said["tokens"]}).json()
        version = http.get("/version")
    assert said["count"] == len(said["tokens"]) == billed["prompt_tokens"] > 0
    assert said["tokens"] == direct["tokens"] and direct["token_strs"] is None
    assert len(said["token_strs"]) == said["count"] and said["max_model_len"] == CONTEXT
    assert chat["count"] == chat_billed["usage"]["prompt_tokens"]
    assert 0 < without_prompt["count"] < chat["count"]
    assert text == {"prompt": PROMPT}
    assert version.status_code == 200 and version.json()["version"]


def test_tokenize_refuses_what_it_cannot_answer(nodes: Nodes) -> None:
    cases = [
        ("/tokenize", {"prompt": "hi", "model": "gpt-9"}, 404, "model"),
        ("/tokenize", {"text": "hi"}, 400, "prompt"),
        ("/tokenize", {"messages": [USER], "add_special_tokens": True}, 400, "add_special_tokens"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ]
    for base in (nodes.colocated.url, nodes.decode.url):
        for route, body, status, param in cases:
            answer = httpx.post(f"{base}{route}", json=body, timeout=30.0, trust_env=False)
            assert answer.status_code == status, (base, route, body, answer.text)
            assert answer.json()["error"]["param"] == param, answer.text
    locked = httpx.post(f"{nodes.limited.url}/tokenize", json={"prompt": "hi"}, timeout=30.0)
    assert locked.status_code == 401


def last_native_event(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """The last event of a /generate stream (it holds the whole output so far)."""
    text = http.post("/generate", json={**body, "stream": True}).text
    events = [line[6:] for line in text.splitlines() if line.startswith("data: {")]
    assert events, text
    return json.loads(events[-1])


def test_a_resumed_generate_stream_goes_on_from_the_logprobs_it_carries(nodes: Nodes) -> None:
    """A /generate stream the gateway moved here (api/resume.py): its events hold the logprobs
    the client got before the move as they were, then this node's, in line with output_ids."""
    greedy = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    asked = {"text": PROMPT, "sampling_params": greedy, "return_logprob": True}
    asked |= {"top_logprobs_num": 2, "logprob_start_len": 0}
    k = 3  # the tokens streamed before the move
    with httpx.Client(base_url=nodes.decode.url, timeout=60.0, trust_env=False) as http:
        whole = last_native_event(http, asked)
        ids, meta = whole["output_ids"], whole["meta_info"]
        fields = {name: meta[name] for name in ("input_token_logprobs", "input_top_logprobs")}
        fields |= {
            name: meta[name][:k] for name in ("output_token_logprobs", "output_top_logprobs")
        }
        moved = {**asked, "pd_resume_ids": ids[:k]}
        resumed = last_native_event(http, {**moved, "pd_resume_logprobs": fields})
        bare = last_native_event(http, moved)["meta_info"]
        short = {"output_token_logprobs": fields["output_token_logprobs"][:2]}
        bad = http.post("/generate", json={**moved, "pd_resume_logprobs": short})
    got = resumed["meta_info"]
    assert resumed["output_ids"] == ids and len(ids) == 8
    for name in ("input_token_logprobs", "input_top_logprobs"):
        assert got[name] == meta[name]
    assert got["output_token_logprobs"][:k] == meta["output_token_logprobs"][:k]
    assert got["output_top_logprobs"][:k] == meta["output_top_logprobs"][:k]
    for mine, first in zip(got["output_token_logprobs"][k:], meta["output_token_logprobs"][k:]):
        assert mine[1:] == first[1:] and mine[0] == pytest.approx(first[0], abs=1e-3)
    assert len(got["output_top_logprobs"]) == len(ids)
    # without the carried fields (a client of the node itself), the resumed ids' entries say
    # their logprobs are unknown, and every entry still belongs to its output id
    assert [t for _, t, _ in bare["output_token_logprobs"]] == ids
    assert [lp for lp, _, _ in bare["output_token_logprobs"][:k]] == [None] * k
    assert bare["output_top_logprobs"][:k] == [None] * k and bare["input_token_logprobs"] == []
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "pd_resume_logprobs"
