"""Schema-driven fuzzing of a live PD cluster: schemathesis reads the gateway's /openapi.json and
sends generated requests (valid and invalid) to every route it lists. No answer may be a 5xx:
bad input is a 4xx in OpenAI's error shape, and what is valid is served.

The gateway's document names the served model, so generated requests reach the nodes through
the PD path whenever they are valid (this run found chat templates that could not render fuzzed
messages answering 500, and the breaker then taking the node out). The cluster's limits keep
generation short (max_tokens at most 8, 8 sequences a request, a 64-token context).
"""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from tests.e2e.cluster_util import Cluster, cluster_yaml, launched

pytestmark = pytest.mark.slow
ST = shutil.which("schemathesis") or shutil.which("st")


@pytest.fixture(scope="module")
def cluster(make_tiny, tmp_path_factory) -> Cluster:
    config = cluster_yaml(make_tiny("llama"), "mooncake", prefill=1, decode=1,
                          max_tokens_limit=8, max_sequences=8)  # fmt: skip
    config["engine"]["max_model_len"] = 64
    with launched(config, tmp_path_factory.mktemp("fuzz")) as c:
        yield c


@pytest.mark.skipif(ST is None, reason="schemathesis is not installed (pip install -e .[test])")
def test_no_generated_request_gets_a_5xx(cluster: Cluster, tmp_path) -> None:
    assert ST is not None
    report = tmp_path / "junit.xml"
    argv = [
        ST, "run", f"{cluster.url}/openapi.json",
        "--checks", "not_a_server_error",
        "--max-examples", "8", "--seed", "7", "--workers", "1",
        "--request-timeout", "60", "--max-time", "25",
        "--report", "junit", "--report-junit-path", str(report),
    ]  # fmt: skip
    # NOTE: --max-time bounds the fuzzing phase (its valid requests generate); the coverage
    # phase's ~1000 boundary cases come first and always run whole
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "<testcase" in report.read_text()  # it did test the routes
    # the cluster still serves after the fuzzing
    body = {"model": "tiny", "prompt": "After the fuzz", "max_tokens": 4}
    r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
