"""2P2D through `pdserve launch`, then one extra gateway per pairing policy over the same nodes.

Every policy must give correct outputs (token ids through the native /generate, text through
the OpenAI completions); round_robin must use every instance.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams
from tests.e2e.cluster_util import REPO, Cluster, cluster_yaml, free_ports, launched, make_load

pytestmark = pytest.mark.slow

POLICIES = ["random", "round_robin", "least_load", "power_of_two", "cache_aware"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def cluster(make_tiny, tmp_path_factory) -> Cluster:
    model = make_tiny("llama")
    config = cluster_yaml(model, "mooncake", prefill=2, decode=2)
    with launched(config, tmp_path_factory.mktemp("2p2d")) as c:
        c.model = model
        yield c


def start_gateway(cluster: Cluster, prefill_policy: str, decode_policy: str) -> str:
    port = free_ports(1)[0]
    argv = [sys.executable, "-m", "cluster.cli", "gateway", "--port", str(port)]
    for node in cluster.config["prefill"]:
        argv += ["--prefill", f"http://127.0.0.1:{node['port']}@{node['bootstrap_port']}"]
    for node in cluster.config["decode"]:
        argv += ["--decode", f"http://127.0.0.1:{node['port']}"]
    argv += ["--prefill-policy", prefill_policy, "--decode-policy", decode_policy]
    argv += ["--tokenizer", str(cluster.model)]
    cluster.extra.append(subprocess.Popen(argv, cwd=REPO, stderr=subprocess.DEVNULL))
    return wait_healthy(f"http://127.0.0.1:{port}", f"gateway {prefill_policy}/{decode_policy}")


def wait_healthy(url: str, what: str, timeout_s: float = 60.0, path: str = "/health") -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} did not come up at {url}")


def node_generate_counts(cluster: Cluster) -> dict[str, int]:
    counts = {}
    for url in cluster.node_urls():
        text = httpx.get(f"{url}/metrics", timeout=10).text
        found = re.findall(r'pdserve_node_requests_total\{[^}]*status="200"\} (\d+)', text)
        counts[url] = sum(int(n) for n in found)
    return counts


async def complete_all(url: str, prompts: list[str]) -> list[str]:
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    try:
        outs = await asyncio.gather(
            *(
                api.completions.create(
                    model="tiny",
                    prompt=p,
                    temperature=0,
                    max_tokens=MAX_NEW,
                    extra_body={"ignore_eos": True},
                )
                for p in prompts
            )
        )
    finally:
        await api.close()
    return [o.choices[0].text for o in outs]


async def generate_all(url: str, prompts: list[str]) -> list[tuple[list[int], str]]:
    """Greedy native /generate of each prompt at once: (output_ids, text) each."""
    params = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        answers = await asyncio.gather(
            *(
                client.post("/generate", json={"text": p, "sampling_params": params})
                for p in prompts
            )
        )
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [(a.json()["output_ids"], a.json()["text"]) for a in answers]


async def complete_and_generate_all(
    url: str, prompts: list[str]
) -> tuple[list[str], list[tuple[list[int], str]]]:
    return await asyncio.gather(complete_all(url, prompts), generate_all(url, prompts))


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_pairs_correctly(cluster: Cluster, policy: str) -> None:
    decode_policy = policy if policy != "cache_aware" else "least_load"
    url = start_gateway(cluster, policy, decode_policy)
    prompts = [f"Policy {policy} request {i}: " + "abc " * (3 * i) for i in range(8)]
    before = node_generate_counts(cluster)
    got, native = asyncio.run(complete_and_generate_all(url, prompts))
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    local = LLM(str(cluster.model), dtype="float32", max_total_tokens=8192)
    expected = local.generate(prompts, params)
    assert native == [(o.token_ids, o.text) for o in expected]
    assert got == [o.text for o in expected]
    after = node_generate_counts(cluster)
    served = {u: after[u] - before[u] for u in after}
    assert sum(served.values()) == 32  # 16 requests, each: one prefill and one decode node
    if policy == "round_robin":
        assert all(n == 8 for n in served.values()), served


def test_pages_all_free_after_load(cluster: Cluster) -> None:
    make_load(cluster)
    infos = cluster.wait_pages_free()
    assert [i["role"] for i in infos] == ["prefill", "prefill", "decode", "decode"]
