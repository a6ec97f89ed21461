"""Conditional disaggregation: a decode node prefills short prompts itself and declines their
rooms at the prefill node, which drops them without computing; long prompts still go PD."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams
from tests.e2e.cluster_util import Cluster, cluster_yaml, launched

pytestmark = pytest.mark.slow
THRESHOLD = 64


@pytest.fixture(scope="module")
def cluster(make_tiny, tmp_path_factory) -> Cluster:
    model = make_tiny("llama")
    config = cluster_yaml(model, "mooncake", prefill=1, decode=1)
    config["decode"][0]["local_prefill_threshold"] = THRESHOLD
    config["transfer"]["bootstrap_timeout_s"] = 20.0
    with launched(config, tmp_path_factory.mktemp("conditional")) as c:
        c.model = model
        yield c


def prefill_metric(cluster: Cluster, name: str) -> int:
    node = cluster.config["prefill"][0]
    text = httpx.get(f"http://127.0.0.1:{node['port']}/metrics", timeout=10).text
    found = re.search(rf"^pdserve_node_{name} (\d+)$", text, re.M)
    return int(found.group(1)) if found else 0


def prefill_prompt_tokens(cluster: Cluster) -> int:
    return prefill_metric(cluster, r"prompt_tokens_total\{[^}]*\}")


def prefill_rooms(cluster: Cluster, state: str) -> int:
    return prefill_metric(cluster, rf'transfer_rooms_total\{{[^}}]*state="{state}"\}}')


def test_short_prompts_prefill_on_decode_long_ones_disaggregate(cluster: Cluster) -> None:
    api = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)
    short, long = "short prompt", "a much longer prompt " * 20
    params = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    before, declined = prefill_prompt_tokens(cluster), prefill_rooms(cluster, "declined")
    failed = prefill_rooms(cluster, "failed")
    start = time.monotonic()
    got_short = api.completions.create(model="tiny", prompt=short, **params)
    # declined at once: no wait for the prefill's bootstrap timeout
    assert time.monotonic() - start < 10
    assert prefill_prompt_tokens(cluster) == before  # the prefill node computed nothing
    # its room counts as declined, not failed (alerts on failed rooms stay quiet)
    wait_until = time.monotonic() + 10
    while prefill_rooms(cluster, "declined") == declined and time.monotonic() < wait_until:
        time.sleep(0.05)
    assert prefill_rooms(cluster, "declined") == declined + 1
    assert prefill_rooms(cluster, "failed") == failed
    got_long = api.completions.create(model="tiny", prompt=long, **params)
    assert got_long.usage.prompt_tokens >= THRESHOLD
    assert prefill_prompt_tokens(cluster) == before + got_long.usage.prompt_tokens
    local = LLM(str(cluster.model), dtype="float32", max_total_tokens=8192)
    sampling = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = local.generate([short, long], sampling)
    assert [got_short.choices[0].text, got_long.choices[0].text] == [o.text for o in expected]
    # token ids (equal text can hide different ids), from the native /generate of both paths
    native = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    for prompt, want in zip([short, long], expected):
        body = {"text": prompt, "sampling_params": native}
        answer = httpx.post(f"{cluster.url}/generate", json=body, timeout=60).json()
        assert "output_ids" in answer, answer
        assert (answer["output_ids"], answer["text"]) == (want.token_ids, want.text)
    cluster.wait_pages_free()
