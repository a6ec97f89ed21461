"""A tiny DeepSeek-V3 (MLA + MoE) served 1P1D through `pdserve launch`.

The prefill node writes MLA latent pages (one buffer per layer) into the decode node's reserved
pages over Mooncake, the same path as MHA pages (MLA over NIXL and NCCL: tests/e2e/test_tp_pd.py,
whose layouts include 1 -> 1). Greedy output must equal transformers'
(token ids through the native /generate, text through the `openai` client), and every page must
be free once a load is over.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from engine.tokenizer import load_tokenizer
from tests.e2e.cluster_util import Cluster, cluster_yaml, launched, make_load
from tests.e2e.test_pd_cluster import GREEDY, expected_ids, expected_text, generate
from tests.test_engine_oracle import MAX_NEW

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hello",
    "Multi-head latent attention caches one compressed vector per token. " * 4,
    "日本語のテキストと emoji 🎉 mixed in",
]


@pytest.fixture(scope="module")
def cluster(make_tiny, tmp_path_factory) -> Cluster:
    model: Path = make_tiny("deepseek_v3", "deepseek", layers=3)
    config = cluster_yaml(model, "mooncake", prefill=1, decode=1)
    with launched(config, tmp_path_factory.mktemp("ds-pd")) as c:
        c.model = model
        yield c


def test_greedy_completions_and_chat_equal_transformers(cluster: Cluster) -> None:
    tok = load_tokenizer(cluster.model)
    api = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)
    for prompt in PROMPTS:
        out = api.completions.create(model="tiny", prompt=prompt, **GREEDY)
        text, n = expected_text(cluster.model, tok(prompt)["input_ids"])
        native = generate(cluster.url, prompt)
        assert native["output_ids"] == expected_ids(cluster.model, tok(prompt)["input_ids"])
        assert out.choices[0].text == native["text"] == text
        assert out.usage.completion_tokens == n == MAX_NEW
    messages = [{"role": "user", "content": "What does MLA keep in its KV cache?"}]
    chat = api.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    native = generate(cluster.url, ids)
    assert native["output_ids"] == expected_ids(cluster.model, ids)
    assert chat.choices[0].message.content == native["text"] == expected_text(cluster.model, ids)[0]


def test_pages_all_free_after_load(cluster: Cluster) -> None:
    make_load(cluster)
    infos = cluster.wait_pages_free()
    assert {i["role"] for i in infos} == {"prefill", "decode"}
