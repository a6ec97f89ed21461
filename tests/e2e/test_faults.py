"""Faults and bad input, on real processes over loopback.

- A 1P1D cluster (`pdserve launch`) whose prefill node fails a fraction of its rooms on purpose
  (`transfer.fault_fraction`): requests succeed or fail cleanly, nodes stay healthy, no page leaks.
- A 2P2D cluster whose components this file starts itself, each in its own process group, so one
  node can be killed with `kill -9` (its HTTP and scheduler processes together) and restarted:
  bad input at a strict gateway in front of it, then a decode node killed under streams, then a
  prefill node killed with requests waiting on it.

The tests of the 2P2D cluster share it and run in file order (the kills come last).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.cluster_util import REPO, cluster_yaml, free_ports, launched

pytestmark = pytest.mark.slow

MODEL = "tiny"
SHORT = 8  # tokens of a request that only has to succeed
# tokens of a stream that must still be running when a node dies: the tiny model's 152k-token
# LM head holds 4 streams on a node to about 150 tok/s each here, so 1024 tokens last about 7 s,
# against under a second between the first and the last stream's start; the decode-kill test
# also freezes its victim with SIGSTOP as soon as every stream has begun
LONG = 1024
STREAMS_TIMEOUT_S = 300.0  # LONG tokens on a machine busy with other test workers
API_KEY = "sk-faults"
MAX_BODY_BYTES = 64 * 1024
MAX_PROMPT_TOKENS = 2000
START_TIMEOUT_S = 300.0  # a node loads torch and the model; this machine may be busy
# Short transfer timeouts, so rooms bound to a dead peer end quickly on the live side.
FAST_TRANSFER = {
    "bootstrap_timeout_s": 15.0,
    "transfer_timeout_s": 15.0,
    "abort_timeout_s": 3.0,
    "heartbeat_interval_s": 0.5,
    "heartbeat_timeout_s": 3.0,
    "quarantine_s": 1.0,  # decode holds a dead prefill's unconfirmed rooms' pages this long
}


# ---- waiting, bounded ----------------------------------------------------------------------


def wait_until(check: Callable[[], Any], what: str, timeout_s: float, poll_s: float = 0.1) -> Any:
    """`check()`'s first truthy result; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        with suppress(httpx.HTTPError):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s")
        time.sleep(poll_s)


def is_ok(url: str, **kw: Any) -> bool:
    return httpx.get(url, timeout=2, **kw).status_code == 200


def wait_pages_free(urls: list[str], timeout_s: float = 30.0) -> None:
    """Every node in `urls` holds no page (free == total, nothing held)."""
    infos: list[dict] = []

    def all_free() -> bool:
        infos[:] = [httpx.get(f"{u}/get_server_info", timeout=10).json() for u in urls]
        return all(i["free_pages"] == i["total_pages"] and i["held"] == 0 for i in infos)

    try:
        wait_until(all_free, "pages returned on every node", timeout_s, poll_s=0.2)
    except AssertionError:
        raise AssertionError(f"pages still held: {json.dumps(infos)}") from None


# ---- metrics ---------------------------------------------------------------------------------


def served(url: str) -> int:
    """Generation requests a node answered with 200 (its /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(r'pdserve_node_requests_total\{[^}]*status="200"\} (\d+)', text)
    return sum(int(n) for n in found)


def gateway_metric(gateway: str, name: str, url: str | None = None) -> int:
    """A gateway counter, or a per-instance gauge when `url` is given."""
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    labels = rf'\{{role="[a-z]+",url="{re.escape(url)}"\}}' if url else ""
    found = re.search(rf"^pdserve_gateway_{name}{labels} (\d+)$", text, re.M)
    assert found, f"no pdserve_gateway_{name} for {url} in /metrics"
    return int(found.group(1))


def healthy_in(gateway: str, url: str) -> bool:
    return gateway_metric(gateway, "instance_healthy", url) == 1


# ---- clients ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int
    text: str = ""
    tokens: int | None = None
    error: dict | None = None
    ended: float = 0.0
    ids: list[int] | None = None  # output token ids: only the native /generate reports them
    longest_wait: float = 0.0  # seconds, the longest silence between two events of a stream

    @property
    def output(self) -> tuple[str, list[int] | None]:
        return self.text, self.ids


def completion(prompt: str, max_tokens: int, stream: bool, native: bool = False) -> dict[str, Any]:
    """A greedy /v1/completions body, or with `native` the same request for /generate."""
    if native:
        params = {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        return {"text": prompt, "sampling_params": params, "stream": stream}
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def complete(
    client: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event | None = None
) -> Outcome:
    """POST /v1/completions (or /generate, for a native body); a stream is read to its end
    (`started` is set at its first event)."""
    path = "/generate" if "text" in body else "/v1/completions"
    if not body.get("stream"):
        r = await client.post(f"{url}{path}", json=body)
        data = r.json()
        if r.status_code != 200:
            return Outcome(r.status_code, error=data.get("error"), ended=time.monotonic())
        out = Outcome(200, ended=time.monotonic())
        read_event(out, data)
        return out
    async with client.stream("POST", f"{url}{path}", json=body) as r:
        if r.status_code != 200:
            data = json.loads(await r.aread())
            return Outcome(r.status_code, error=data.get("error"), ended=time.monotonic())
        out, last = Outcome(200), None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.monotonic()
            out.longest_wait = max(out.longest_wait, now - (last or now))
            last = now
            if started is not None:
                started.set()
            if line == "data: [DONE]":
                break
            read_event(out, json.loads(line[len("data: ") :]))
    out.ended = time.monotonic()
    return out


def read_event(out: Outcome, event: dict) -> None:
    if "error" in event:
        out.error = event["error"]
        return
    if "output_ids" in event:  # native: every event holds the whole output so far
        out.text, out.ids = event["text"], event["output_ids"]
        out.tokens = event["meta_info"]["completion_tokens"]
        return
    out.text += "".join(c["text"] for c in event.get("choices", []))
    if event.get("usage"):
        out.tokens = event["usage"]["completion_tokens"]


async def complete_all(url: str, bodies: list[dict], headers: dict | None = None) -> list[Outcome]:
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        return await asyncio.gather(*(complete(client, url, b) for b in bodies))


@functools.cache
def offline_engine(model: Path) -> Any:
    from engine.llm import LLM

    return LLM(str(model), dtype="float32", max_total_tokens=16384)


def expected_outputs(model: Path, bodies: list[dict], max_tokens: int) -> list[tuple]:
    """What a correct cluster answers each body (`Outcome.output`): the offline engine's greedy
    text, and its token ids where the body is native (random weights often decode to U+FFFD, so
    equal text can hide different ids)."""
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [b.get("text", b.get("prompt")) for b in bodies]
    outs = offline_engine(model).generate(prompts, params)
    return [(o.text, o.token_ids if "text" in b else None) for o, b in zip(outs, bodies)]


def assert_openai_error(data: Any, type_: str) -> dict:
    assert isinstance(data, dict) and set(data) == {"error"}, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == type_ and error["message"], error
    return error


# ---- the fault knob --------------------------------------------------------------------------


def test_fault_fraction_must_be_a_fraction() -> None:
    from cluster.config import parse_cluster

    data = {"model": {"path": "m"}, "decode": [{"name": "decode-0", "port": 30002}]}
    assert parse_cluster(data).transfer.fault_fraction == 0.0
    with pytest.raises(ValueError, match=r"transfer\.fault_fraction: must be between 0 and 1"):
        parse_cluster({**data, "transfer": {"fault_fraction": 1.5}})


def test_fault_fraction_fails_rooms_cleanly_without_leaks(make_tiny, tmp_path) -> None:
    model = make_tiny("llama")
    config = cluster_yaml(model, "mooncake", prefill=1, decode=1, max_retries=1)
    config["transfer"]["fault_fraction"] = 0.3
    prompts = [f"Fault knob request {i}: " + "pages " * (2 * i) for i in range(24)]
    bodies = [
        completion(p, SHORT, stream=i % 2 == 1, native=i % 4 >= 2) for i, p in enumerate(prompts)
    ]
    with launched(config, tmp_path) as cluster:
        outcomes = asyncio.run(complete_all(cluster.url, bodies))
        expected = expected_outputs(model, bodies, SHORT)
        for outcome, want in zip(outcomes, expected):
            if outcome.status == 200:
                assert (outcome.output, outcome.tokens, outcome.error) == (want, SHORT, None)
            else:
                assert outcome.status in (502, 503), outcome
                error = assert_openai_error({"error": outcome.error}, "server_error")
                assert outcome.status == 503 or "injected transfer fault" in error["message"]
        retries = gateway_metric(cluster.url, "retries_total")
        failed = sum(o.status != 200 for o in outcomes)
        assert retries + failed > 0, "no room failed: the fault knob did nothing"
        for url in cluster.node_urls():
            assert is_ok(f"{url}/health")
            assert healthy_in(cluster.url, url)
        assert is_ok(f"{cluster.url}/health")
        cluster.wait_pages_free(timeout_s=30)


# ---- a cluster of separately started components ----------------------------------------------


@dataclass
class Component:
    """One `python -m cluster.cli ROLE --config FILE --name NAME`, in its own process group."""

    name: str
    argv: list[str]
    url: str
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: the scheduler process shares it
            )

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log.read_text()[-3000:]
                raise AssertionError(f"{self.name} exited while starting:\n{tail}")
            return is_ok(f"{self.url}/health")

        wait_until(up, f"{self.name} healthy at {self.url}", timeout_s, poll_s=0.25)

    def signal(self, signum: int) -> None:
        """`signum` to the whole group (HTTP process, scheduler process, helpers)."""
        assert self.proc is not None
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """kill -9 of the node: every process of its group."""
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=30)

    def terminate(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)  # NOTE: a stopped group would never act on SIGTERM
            self.signal(signal.SIGTERM)

    def reap(self, deadline: float) -> None:
        """Wait for the group to stop until `deadline`, then SIGKILL whatever is left of it."""
        if self.proc is None:
            return
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@dataclass
class Nodes:
    model: Path
    config_path: Path
    components: dict[str, Component] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return self.components[name].url

    @property
    def gateway(self) -> str:
        return self.url("gateway")

    def add(self, role: str, name: str, port: int, sets: tuple[str, ...] = ()) -> Component:
        argv = [sys.executable, "-m", "cluster.cli", role, "--config", str(self.config_path)]
        argv += ["--name", "gateway" if role == "gateway" else name]
        argv += [arg for text in sets for arg in ("--set", text)]
        log = self.config_path.parent / f"{name}.log"
        component = Component(name, argv, f"http://127.0.0.1:{port}", log)
        self.components[name] = component
        return component

    def stop_all(self, grace_s: float = 20.0) -> None:
        components = list(self.components.values())
        for component in components:
            component.terminate()
        deadline = time.monotonic() + grace_s
        for component in components:
            component.reap(deadline)


def two_by_two(model: Path, tmp: Path) -> tuple[dict, Path]:
    config = cluster_yaml(
        model,
        "mooncake",
        prefill=2,
        decode=2,
        prefill_policy="round_robin",
        decode_policy="round_robin",
        health_interval_s=0.5,
        health_failures=2,
    )
    config["transfer"].update(FAST_TRANSFER)
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, path


@pytest.fixture(scope="module")
def nodes(make_tiny, tmp_path_factory) -> Iterator[Nodes]:
    model = make_tiny("llama")
    config, path = two_by_two(model, tmp_path_factory.mktemp("faults-2p2d"))
    cluster = Nodes(model, path)
    try:
        for role in ("prefill", "decode"):
            for node in config[role]:
                cluster.add(role, node["name"], node["port"]).start()
        for component in list(cluster.components.values()):
            component.wait_healthy()
        cluster.add("gateway", "gateway", config["gateway"]["port"]).start()
        cluster.components["gateway"].wait_healthy(60)
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def strict(nodes: Nodes) -> str:
    """A second gateway in front of the same nodes, with an API key and small limits."""
    port = free_ports(1)[0]
    sets = (
        f"gateway.port={port}",
        f"gateway.api_key={API_KEY}",
        f"gateway.max_body_bytes={MAX_BODY_BYTES}",
        f"gateway.max_prompt_tokens={MAX_PROMPT_TOKENS}",
    )
    gateway = nodes.add("gateway", "strict-gateway", port, sets)
    gateway.start()
    gateway.wait_healthy(60)
    # NOTE: /v1/models also fills the gateway's list of served models (unknown model -> 404).
    models = f"{gateway.url}/v1/models"
    wait_until(lambda: is_ok(models, headers=AUTH), "strict gateway lists its models", 30)
    return gateway.url


# ---- bad input at the gateway ----------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK_BODY = completion("Hello there", 4, stream=False)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _body(**changes: Any) -> bytes:
    return json.dumps({**OK_BODY, **changes}).encode()


def _chunks(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), 8192):
        yield data[i : i + 8192]


LONG_PROMPT = "word " * (MAX_PROMPT_TOKENS + 500)
# (path, body, headers, status, OpenAI error type, param, code)
BAD_INPUT: dict[str, tuple] = {
    "malformed_json": (COMPLETIONS, b'{"model": "tiny", "prompt": ', AUTH, 400, None, None),
    "body_not_an_object": (COMPLETIONS, b"[1, 2, 3]", AUTH, 400, None, None),
    "max_tokens_a_string": (COMPLETIONS, _body(max_tokens="ten"), AUTH, 400, "max_tokens", None),
    "prompt_a_number": (COMPLETIONS, _body(prompt=42), AUTH, 400, "prompt", None),
    "temperature_a_string": (COMPLETIONS, _body(temperature="hot"), AUTH, 400, "temperature", None),
    "messages_a_string": (
        CHAT,
        json.dumps({"model": MODEL, "messages": "hi"}).encode(),
        AUTH,
        400,
        "messages",
        None,
    ),
    "negative_max_tokens": (COMPLETIONS, _body(max_tokens=-5), AUTH, 400, "max_tokens", None),
    "huge_max_tokens": (COMPLETIONS, _body(max_tokens=10**9), AUTH, 400, None, None),
    "max_tokens_beyond_64_bits": (COMPLETIONS, _body(max_tokens=2**70), AUTH, 400, None, None),
    "unknown_model": (
        COMPLETIONS,
        _body(model="gpt-9"),
        AUTH,
        404,
        "model",
        "model_not_found",
    ),
    "over_long_prompt": (
        COMPLETIONS,
        _body(prompt=LONG_PROMPT),
        AUTH,
        400,
        "prompt",
        "context_length_exceeded",
    ),
    "over_long_chat": (
        CHAT,
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}]}
        ).encode(),
        AUTH,
        400,
        "messages",
        "context_length_exceeded",
    ),
    "oversized_body": (
        COMPLETIONS,
        _body(prompt="x" * MAX_BODY_BYTES),
        AUTH,
        413,
        None,
        "request_too_large",
    ),
    "oversized_chunked_body": (
        COMPLETIONS,
        "chunked",
        AUTH,
        413,
        None,
        "request_too_large",
    ),
    "missing_api_key": (COMPLETIONS, _body(), {}, 401, None, "invalid_api_key"),
    "wrong_api_key": (
        COMPLETIONS,
        _body(),
        {"Authorization": "Bearer sk-wrong"},
        401,
        None,
        "invalid_api_key",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_4xx_in_openai_shape(strict: str, case: str) -> None:
    path, content, headers, status, param, code = BAD_INPUT[case]
    if content == "chunked":  # no content-length: the gateway must count while it reads
        content = _chunks(_body(prompt="x" * MAX_BODY_BYTES))
    headers = {**headers, "content-type": "application/json"}
    r = httpx.post(f"{strict}{path}", content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = assert_openai_error(r.json(), "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    normal = httpx.post(f"{strict}{COMPLETIONS}", json=OK_BODY, headers=AUTH, timeout=60)
    assert normal.status_code == 200, normal.text
    assert normal.json()["usage"]["completion_tokens"] == 4


def test_nodes_keep_the_transfer_engines_info_lines_out_of_their_logs(nodes: Nodes) -> None:
    """At the default log_level (warning) Mooncake's C++ log says no INFO line (one per
    transfer, as "Batch Transfer completed!", before MC_LOG_LEVEL followed log_level)."""
    assert served(nodes.url("decode-0")) + served(nodes.url("decode-1")) > 0
    for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        text = nodes.components[name].log.read_text()
        assert not re.search(r"^I\d{4} ", text, re.M), f"{name} logged Mooncake INFO lines"


# ---- SIGSTOP of a decode node -----------------------------------------------------------------

HANG_BOUND_S = (
    15.0  # a hung node's streams go on within this: its probes, not the 20 s token timeout
)


def test_decode_hang_moves_its_streams_within_seconds_and_it_is_probed_back_in(
    nodes: Nodes,
) -> None:
    gateway, victim = nodes.gateway, nodes.url("decode-0")
    prompts = [f"Hang {i}: " + "a story about a stuck node " * (i + 1) for i in range(6)]
    bodies = [completion(p, LONG, stream=True, native=i % 3 == 2) for i, p in enumerate(prompts)]
    hung = nodes.components["decode-0"]
    moved = gateway_metric(gateway, "migrations_total")

    def stop_and_count() -> int:
        # NOTE: stop first, then count: counted first, a fast machine finished the victim's
        # streams in between (0 victims, seen in CI); stopped, they stay in flight
        hung.signal(signal.SIGSTOP)
        return gateway_metric(gateway, "instance_outstanding_requests", victim)

    outcomes, victims, _ = asyncio.run(
        streams_across_a_kill(gateway, bodies, stop_and_count, lambda: None)
    )
    try:
        assert victims >= 1
        assert [o.error for o in outcomes] == [None] * len(outcomes)
        expected = expected_outputs(nodes.model, bodies, LONG)
        assert [(o.output, o.tokens) for o in outcomes] == [(e, LONG) for e in expected]
        assert max(o.longest_wait for o in outcomes) < HANG_BOUND_S
        assert gateway_metric(gateway, "migrations_total") - moved == victims
        assert not healthy_in(gateway, victim)
    finally:
        hung.signal(signal.SIGCONT)
    wait_until(lambda: healthy_in(gateway, victim), "gateway probes decode-0 back in", 30)
    again = [completion(f"After the hang {i}", SHORT, stream=i % 2 == 0) for i in range(4)]
    assert all(o.error is None for o in asyncio.run(complete_all(gateway, again)))
    wait_pages_free([nodes.url(n) for n in ("prefill-0", "prefill-1", "decode-0", "decode-1")])


# ---- kill -9 of a decode node ----------------------------------------------------------------


async def streams_across_a_kill(
    url: str, bodies: list[dict], before_kill: Callable[[], int], kill: Callable[[], None]
) -> tuple[list[Outcome], int, float]:
    """Start every stream, kill once all are streaming: (outcomes, before_kill(), kill time)."""
    async with httpx.AsyncClient(timeout=120) as client:
        started = [asyncio.Event() for _ in bodies]
        tasks = [
            asyncio.ensure_future(complete(client, url, body, ev))
            for body, ev in zip(bodies, started)
        ]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
        counted = await asyncio.to_thread(before_kill)
        killed_at = time.monotonic()
        await asyncio.to_thread(kill)
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), STREAMS_TIMEOUT_S)
    return outcomes, counted, killed_at


def test_decode_kill_moves_its_streams_and_it_comes_back(nodes: Nodes) -> None:
    gateway, live, victim = nodes.gateway, nodes.url("decode-0"), nodes.url("decode-1")
    prompts = [f"Stream {i}: " + "a long story about pages " * (i + 1) for i in range(8)]
    bodies = [completion(p, LONG, stream=True, native=i % 2 == 1) for i, p in enumerate(prompts)]
    dead = nodes.components["decode-1"]
    moved = gateway_metric(gateway, "migrations_total")

    def stop_and_count() -> int:
        # NOTE: SIGSTOP as soon as every stream has begun, so the victim's streams cannot end
        # before the kill however fast decoding is; the gateway still counts them in flight
        dead.signal(signal.SIGSTOP)
        return gateway_metric(gateway, "instance_outstanding_requests", victim)

    try:
        outcomes, victims, _ = asyncio.run(
            streams_across_a_kill(gateway, bodies, stop_and_count, dead.kill)
        )
        # round_robin put about half of the 8 streams on each decode node (a retry before the
        # first byte may shift one: 3 seen in CI); the dead one's moved to the live one
        # mid-stream, and every client got the whole answer, as if nothing had happened
        assert victims >= 1
        assert [o.error for o in outcomes] == [None] * len(outcomes)
        expected = expected_outputs(nodes.model, bodies, LONG)
        want = [(200, e, LONG) for e in expected]
        assert [(o.status, o.output, o.tokens) for o in outcomes] == want
        assert gateway_metric(gateway, "migrations_total") - moved == victims
        assert gateway_metric(gateway, "stream_errors_total") == 0
    except BaseException:  # NOTE: the tests after this one need decode-1 back
        dead.kill()
        dead.start()
        dead.wait_healthy()
        raise

    # The gateway takes the dead node out: new requests all go to the live one, no retries.
    wait_until(lambda: not healthy_in(gateway, victim), "gateway takes decode-1 out", 30)
    nodes.components["decode-1"].start()  # NOTE: now, so that it loads while we check
    before, retries = served(live), gateway_metric(gateway, "retries_total")
    short = [completion(f"After the kill {i}", SHORT, stream=i % 2 == 0) for i in range(4)]
    assert all(
        o.status == 200 and o.error is None for o in asyncio.run(complete_all(gateway, short))
    )
    assert served(live) - before == 4
    assert gateway_metric(gateway, "retries_total") == retries
    assert not healthy_in(gateway, victim)  # still out: none of those could have gone there

    # Restarted on the same port, it is taken back and gets requests again.
    nodes.components["decode-1"].wait_healthy()
    wait_until(lambda: healthy_in(gateway, victim), "gateway takes decode-1 back", 30)
    again = [completion(f"After the restart {i}", SHORT, stream=False) for i in range(4)]
    assert all(o.status == 200 for o in asyncio.run(complete_all(gateway, again)))
    assert served(victim) >= 1
    wait_pages_free([nodes.url(n) for n in ("prefill-0", "prefill-1", "decode-0", "decode-1")])


# ---- kill -9 of a prefill node ---------------------------------------------------------------


def test_prefill_kill_retries_waiting_requests_on_the_other_prefill(nodes: Nodes) -> None:
    gateway, victim = nodes.gateway, nodes.url("prefill-1")
    dead = nodes.components["prefill-1"]
    long_prompts = [f"Streaming through prefill {i}: " + "tokens " * 20 for i in range(2)]
    short_prompts = [f"Waiting on prefill {i}: " + "abc " * (3 * i) for i in range(8)]
    retries = gateway_metric(gateway, "retries_total")
    bodies = [
        completion(p, SHORT, stream=i % 2 == 0, native=i % 4 >= 2)
        for i, p in enumerate(short_prompts)
    ]

    async def run() -> tuple[list[Outcome], list[Outcome], int]:
        async with httpx.AsyncClient(timeout=120) as client:
            started = [asyncio.Event() for _ in long_prompts]
            streams = [
                asyncio.ensure_future(complete(client, gateway, completion(p, LONG, True), ev))
                for p, ev in zip(long_prompts, started)
            ]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
            # NOTE: a stream's first token can reach the client before its prefill node's own
            # answer reaches the gateway; wait for those, so `held` below counts only requests
            # that are still waiting on prefill-1.
            await asyncio.to_thread(
                wait_until,
                lambda: gateway_metric(gateway, "instance_outstanding_requests", victim) == 0,
                "the streams' prefill answers",
                30,
            )
            # NOTE: SIGSTOP first holds the requests sent to prefill-1 there (not yet streaming),
            # so the kill -9 that follows always catches some.
            dead.signal(signal.SIGSTOP)
            waiting = [asyncio.ensure_future(complete(client, gateway, b)) for b in bodies]
            held = await asyncio.to_thread(
                wait_until,
                lambda: gateway_metric(gateway, "instance_outstanding_requests", victim),
                "requests waiting on the stopped prefill-1",
                30,
            )
            await asyncio.to_thread(dead.kill)
            done = await asyncio.wait_for(asyncio.gather(*waiting), 120)
            streams_done = asyncio.gather(*streams)
            return await asyncio.wait_for(streams_done, STREAMS_TIMEOUT_S), done, held

    streams, outcomes, held = asyncio.run(run())
    assert held >= 1
    assert [(o.status, o.error) for o in outcomes] == [(200, None)] * len(outcomes)
    assert [o.output for o in outcomes] == expected_outputs(nodes.model, bodies, SHORT)
    assert [(o.error, o.tokens) for o in streams] == [(None, LONG)] * len(streams)
    assert gateway_metric(gateway, "retries_total") - retries >= held

    # The cluster keeps serving on prefill-0, and no page stays held on the live nodes.
    wait_until(lambda: not healthy_in(gateway, victim), "gateway takes prefill-1 out", 30)
    more = [completion(f"Still serving {i}", SHORT, stream=False) for i in range(4)]
    assert all(o.status == 200 for o in asyncio.run(complete_all(gateway, more)))
    # rooms of the dead prefill end by abort/heartbeat timeouts on decode (FAST_TRANSFER)
    wait_pages_free([nodes.url(n) for n in ("prefill-0", "decode-0", "decode-1")])


# ---- every prefill node dead -----------------------------------------------------------------


def test_with_every_prefill_dead_decode_nodes_prefill_until_one_is_back(nodes: Nodes) -> None:
    """The last prefill node killed too (the test before killed prefill-1): decode nodes prefill
    the requests themselves (gateway.prefill_fallback), the same tokens, no failures; a
    restarted prefill node takes its share back."""
    gateway, back = nodes.gateway, nodes.url("prefill-0")
    for name in ("prefill-0", "prefill-1"):
        nodes.components[name].kill()
    for name in ("prefill-0", "prefill-1"):
        url = nodes.url(name)
        wait_until(lambda url=url: not healthy_in(gateway, url), f"gateway takes {name} out", 30)
    assert httpx.get(f"{gateway}/health", timeout=10).status_code == 200
    fallbacks, retries = (
        gateway_metric(gateway, m) for m in ("prefill_fallbacks_total", "retries_total")
    )
    bodies = [
        completion(f"No prefill node left {i}: " + "abc " * i, SHORT, stream=i % 2 == 0,
                   native=i % 4 >= 2)
        for i in range(6)
    ]  # fmt: skip
    outcomes = asyncio.run(complete_all(gateway, bodies))
    assert [(o.status, o.error) for o in outcomes] == [(200, None)] * len(bodies)
    assert [o.output for o in outcomes] == expected_outputs(nodes.model, bodies, SHORT)
    assert gateway_metric(gateway, "prefill_fallbacks_total") - fallbacks == len(bodies)
    assert gateway_metric(gateway, "retries_total") == retries

    nodes.components["prefill-0"].start()
    nodes.components["prefill-0"].wait_healthy()
    wait_until(lambda: healthy_in(gateway, back), "gateway takes prefill-0 back", 30)
    fallbacks, before = gateway_metric(gateway, "prefill_fallbacks_total"), served(back)
    again = [completion(f"Prefill is back {i}", SHORT, stream=False) for i in range(4)]
    assert all(o.status == 200 for o in asyncio.run(complete_all(gateway, again)))
    assert served(back) - before == 4
    assert gateway_metric(gateway, "prefill_fallbacks_total") == fallbacks
    wait_pages_free([nodes.url(n) for n in ("prefill-0", "decode-0", "decode-1")])


def test_killed_nodes_leave_no_files_behind(nodes: Nodes) -> None:
    """The kills above left nothing in the temp dir: a node's HTTP-scheduler channel lives in
    the abstract socket namespace (it used to leave a /tmp/pdserve-* directory per kill -9)."""
    since = nodes.config_path.stat().st_mtime  # written before any node started
    left = [p for p in Path(tempfile.gettempdir()).glob("pdserve-*") if p.stat().st_mtime >= since]
    assert left == []
