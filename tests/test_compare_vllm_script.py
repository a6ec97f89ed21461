"""scripts/compare_vllm.py plans a fair head-to-head without vLLM (`--dry-run` starts nothing,
and the pdserve commands it prints pass `pdserve launch --dry-run`), and its vLLM 1P1D proxy
routes prefill-then-decode as vLLM's toy proxy does (upstreams faked, nothing started)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e.cluster_util import REPO

SCRIPT = REPO / "scripts" / "compare_vllm.py"
SETUPS = ["pdserve-colocated", "pdserve-1p1d", "vllm", "vllm-1p1d"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def sets(argv: list[str]) -> dict[str, str]:
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return dict(p.split("=", 1) for p in pairs)


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    done = run_script(
        "--dry-run", "--preset", "tiny", "--model-root", str(root / "models"),
        "--log-dir", str(root / "logs"), "--num-prompts", "8", "--max-model-len", "1024",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not list(root.iterdir()), "a dry run wrote files (a checkpoint, logs or a shim)"
    return {**report, "stdout": done.stdout}


def test_help_names_every_setup_and_the_fairness_terms() -> None:
    done = run_script("--help")
    assert done.returncode == 0, done.stderr
    for word in [*SETUPS, "--dry-run", "--preset", "--model", "OMP_NUM_THREADS", "prefix"]:
        assert word in done.stdout


def test_the_pdserve_commands_pass_pdserve_launch_dry_run(plan: dict) -> None:
    for name, config in (("pdserve-colocated", "local-colocated"), ("pdserve-1p1d", "local-cpu")):
        (launch,) = plan["setups"][name]["processes"]
        argv = launch["argv"]
        assert argv[1:4] == ["-m", "cluster.cli", "launch"] and argv[4].endswith(f"{config}.yaml")
        done = subprocess.run(
            [*argv, "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "config ok" in done.stdout
        gateway = sets(argv)["gateway.port"]
        assert launch["ready_url"] == f"http://127.0.0.1:{gateway}/v1/models"
        assert f"would serve http://127.0.0.1:{gateway}/v1" in done.stdout


def test_every_setup_serves_the_same_model_the_same_way(plan: dict) -> None:
    setups = plan["setups"]
    model = plan["fairness"]["checkpoint"]
    assert model.endswith("llama-l4-h256-a4-kv2-bfloat16")
    for name in ("pdserve-colocated", "pdserve-1p1d"):
        s = sets(setups[name]["processes"][0]["argv"])
        assert s["model.path"] == model and s["engine.dtype"] == "bfloat16"
        assert s["engine.max_model_len"] == "1024" and s["engine.enable_prefix_cache"] == "false"
    servers = [*setups["vllm"]["processes"], *setups["vllm-1p1d"]["processes"][:2]]
    for server in servers:
        argv = server["argv"]
        assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert flag(argv, "--model") == model and flag(argv, "--dtype") == "bfloat16"
        assert flag(argv, "--max-model-len") == "1024" and "--no-enable-prefix-caching" in argv
        assert int(server["env"]["VLLM_CPU_KVCACHE_SPACE"]) >= 1
    benches = [s["bench"] for s in setups.values()]
    for bench in benches:  # one workload: only where it goes and where it writes differ
        assert flag(bench, "--tokenizer") == model and flag(bench, "--num-prompts") == "8"
        assert flag(bench, "--base-url") == setups[bench_setup(setups, bench)]["base_url"]
    drop = {"--base-url", "--output-file"}
    stripped = [
        [a for i, a in enumerate(b) if a not in drop and b[i - 1] not in drop] for b in benches
    ]
    assert all(s == stripped[0] for s in stripped)


def bench_setup(setups: dict, bench: list[str]) -> str:
    return next(name for name, s in setups.items() if s["bench"] is bench)


def test_vllm_engines_get_the_threads_pdserve_gives_its_nodes(plan: dict) -> None:
    threads = plan["fairness"]["threads_per_engine_process"]
    colocated, pd = threads["pdserve-colocated"], threads["pdserve-1p1d"]
    assert threads["vllm"] == {"vllm": colocated["decode-0"]}
    assert threads["vllm-1p1d"] == {"vllm-prefill": pd["prefill-0"], "vllm-decode": pd["decode-0"]}
    (server,) = plan["setups"]["vllm"]["processes"]
    assert server["env"]["OMP_NUM_THREADS"] == str(colocated["decode-0"])
    prefill, decode, _ = plan["setups"]["vllm-1p1d"]["processes"]
    for proc, node in ((prefill, "prefill-0"), (decode, "decode-0")):
        cores = proc["env"]["VLLM_CPU_OMP_THREADS_BIND"].split(",")
        assert len(cores) == int(proc["env"]["OMP_NUM_THREADS"]) == pd[node]


def test_vllm_1p1d_is_two_nixl_servers_behind_the_proxy(plan: dict) -> None:
    setup = plan["setups"]["vllm-1p1d"]
    prefill, decode, proxy = setup["processes"]
    side_ports = set()
    for server in (prefill, decode):
        kv = json.loads(flag(server["argv"], "--kv-transfer-config"))
        assert kv["kv_connector"] == "NixlConnector" and kv["kv_role"] == "kv_both"
        assert server["env"]["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
        side_ports.add(server["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"])
    assert len(side_ports) == 2
    argv = proxy["argv"]
    assert argv[1].endswith("compare_vllm_proxy.py")
    assert flag(argv, "--prefill") == f"http://127.0.0.1:{flag(prefill['argv'], '--port')}"
    assert flag(argv, "--decode") == f"http://127.0.0.1:{flag(decode['argv'], '--port')}"
    assert setup["base_url"] == f"http://127.0.0.1:{flag(argv, '--port')}"
    ports = [flag(p["argv"], "--port") for p in (prefill, decode, proxy)]
    assert len(set(ports) | side_ports) == 5 and not {"30000", "29000"} & set(ports)


class Chunks(httpx.AsyncByteStream):
    """A streamed body, as a server's SSE arrives (the proxy relays it chunk by chunk)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk


def proxy_module():
    sys.path.insert(0, str(REPO / "scripts"))
    import compare_vllm_proxy

    return compare_vllm_proxy


async def post_through_proxy(prefill_handler, decode_handler, body: dict) -> httpx.Response:
    mod = proxy_module()
    prefill = httpx.AsyncClient(transport=httpx.MockTransport(prefill_handler), base_url="http://p")
    decode = httpx.AsyncClient(transport=httpx.MockTransport(decode_handler), base_url="http://d")
    app = mod.build_app(mod.PdProxy(prefill, decode))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        return await client.post("/v1/completions", json=body, headers={"X-Request-Id": "r1"})


def test_the_proxy_prefills_one_token_then_streams_the_decode() -> None:
    seen: dict[str, httpx.Request] = {}
    kv = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [3, 4]}

    def on_prefill(request: httpx.Request) -> httpx.Response:
        seen["prefill"] = request
        return httpx.Response(200, json={"choices": [{"text": "x"}], "kv_transfer_params": kv})

    def on_decode(request: httpx.Request) -> httpx.Response:
        seen["decode"] = request
        events = [b'data: {"choices": [{"text": "hi"}]}\n\n', b"data: [DONE]\n\n"]
        return httpx.Response(
            200, stream=Chunks(events), headers={"content-type": "text/event-stream"}
        )

    body = {"model": "m", "prompt": "p", "max_tokens": 32, "stream": True, "min_tokens": 2,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    answer = asyncio.run(post_through_proxy(on_prefill, on_decode, body))
    assert answer.status_code == 200 and answer.content.endswith(b"data: [DONE]\n\n")
    first = json.loads(seen["prefill"].content)
    assert first["max_tokens"] == 1 and first["stream"] is False
    assert first["kv_transfer_params"]["do_remote_decode"] is True
    assert "stream_options" not in first and "min_tokens" not in first
    second = json.loads(seen["decode"].content)
    assert second == {**body, "kv_transfer_params": kv}
    assert seen["prefill"].headers["x-request-id"] == seen["decode"].headers["x-request-id"] == "r1"


def test_a_failed_prefill_is_answered_without_a_decode() -> None:
    def on_decode(request: httpx.Request) -> httpx.Response:
        raise AssertionError("decode called after a failed prefill")

    def on_prefill(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "too long"})

    answer = asyncio.run(
        post_through_proxy(on_prefill, on_decode, {"prompt": "p", "max_tokens": 4})
    )
    assert answer.status_code == 400 and answer.json() == {"error": "too long"}


def test_stopping_a_setup_leaves_no_process_of_it(tmp_path) -> None:
    """A root and its child that both ignore SIGTERM (a hung server): both are killed, the
    count says so, and a well-behaved setup is stopped without a kill."""
    sys.path.insert(0, str(REPO / "scripts"))
    import psutil
    from compare_vllm_procs import family, start, stop
    from compare_vllm_setups import Proc, Setup

    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); time.sleep(60)"
    )
    hung = Proc("hung", (sys.executable, "-c", stubborn), {}, "http://127.0.0.1:1/")
    polite = Proc("polite", (sys.executable, "-c", "import time; time.sleep(60)"), {}, "")
    for proc, killed in ((hung, 2), (polite, 0)):
        running = start(Setup(proc.name, (proc,), "", {}), tmp_path / proc.name)
        deadline = time.monotonic() + 10
        while len(family([running.popens[0][1]])) < killed and time.monotonic() < deadline:
            time.sleep(0.05)  # the hung root's child starting
        members = family([running.popens[0][1]])
        assert len(members) == max(killed, 1)
        assert stop(running, grace_s=1.0) == killed
        assert not [p for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
