"""The setups that scripts/compare_vllm.py runs: for each, the exact commands and environment
of its processes and the URL that says each is ready, built from one `Common` so that every
setup serves the same checkpoint with the same dtype, context, batch limits, KV capacity and
prefix-cache setting, with the threads pdserve's config gives each engine process.
(scripts/compare_vllm_procs.py starts and stops them.)

pdserve's numbers come from its config (`engine.threads` defaults to the cores split among the
nodes on the host; `max_running`, `max_batch_tokens`, `max_total_tokens`), so the vLLM commands
are written from the same resolved config rather than from constants that could drift.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster.config import load_cluster, resolve_config_path
from engine.options import EngineOptions

REPO = Path(__file__).resolve().parent.parent
PROXY = REPO / "scripts" / "compare_vllm_proxy.py"
SETUPS = ("pdserve-colocated", "pdserve-1p1d", "vllm", "vllm-1p1d")
CONFIGS = {"pdserve-colocated": "local-colocated", "pdserve-1p1d": "local-cpu"}
# vLLM setups take their threads (and limits) from the pdserve setup of the same shape.
MIRRORS = {"vllm": "pdserve-colocated", "vllm-1p1d": "pdserve-1p1d"}
VLLM_SERVER = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PORT_RANGE = (20000, 28999)  # below the ephemeral range, above Mooncake's 12001-17000


@dataclass(frozen=True)
class Common:
    """What every setup shares (the fairness terms)."""

    model_dir: Path
    served_name: str
    dtype: str
    max_model_len: int
    prefix_cache: bool
    kv_bytes_per_token: int  # all layers, K and V, in `dtype`
    vllm_eager: bool
    log_dir: Path


@dataclass(frozen=True)
class Proc:
    """One process of a setup: its command, the environment it adds, and when it is ready."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    ready_url: str

    def describe(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}".strip()


@dataclass(frozen=True)
class Setup:
    name: str
    procs: tuple[Proc, ...]
    base_url: str  # what the benchmark client talks to
    threads: Mapping[str, int]  # engine process -> CPU threads
    notes: tuple[str, ...] = ()

    def plan(self) -> dict:
        procs = [
            {"name": p.name, "argv": list(p.argv), "env": dict(p.env), "ready_url": p.ready_url}
            for p in self.procs
        ]
        return {"base_url": self.base_url, "threads": dict(self.threads), "processes": procs}


def free_ports(n: int) -> list[int]:
    """n distinct ports, each bindable on 127.0.0.1 now, drawn at random from PORT_RANGE (a
    kernel-given port goes back to the ephemeral pool and can be taken before a server binds)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randint(*PORT_RANGE)
        if port not in ports and bindable(port):
            ports.append(port)
    return ports


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


# --- pdserve ----------------------------------------------------------------------------------


def pdserve_overrides(common: Common, name: str, ports: Sequence[int]) -> list[str]:
    sets = [
        f"model.path={common.model_dir}",
        "model.make=null",
        f"served_model_name={common.served_name}",
        f"engine.dtype={common.dtype}",
        f"engine.max_model_len={common.max_model_len}",
        f"engine.enable_prefix_cache={str(common.prefix_cache).lower()}",
        f"gateway.port={ports[0]}",
        f"decode.0.port={ports[1]}",
    ]
    if name == "pdserve-1p1d":
        sets += [f"prefill.0.port={ports[2]}", f"prefill.0.bootstrap_port={ports[3]}"]
    return sets


def node_engines(config: str, overrides: Sequence[str]) -> dict[str, EngineOptions]:
    """Each node's engine options as pdserve resolves them (threads included) on this machine."""
    cluster = load_cluster(resolve_config_path(config), list(overrides))
    names = [n.name for n in (*cluster.prefill, *cluster.decode)]
    return {name: cluster.node_settings(name).engine for name in names}


def pdserve_setup(name: str, common: Common) -> Setup:
    ports = free_ports(4)
    sets = pdserve_overrides(common, name, ports)
    config = str(resolve_config_path(CONFIGS[name]))
    argv = [sys.executable, "-m", "cluster.cli", "launch", config]
    argv += [arg for s in sets for arg in ("--set", s)]
    argv += ["--log-dir", str(common.log_dir / name)]
    engines = node_engines(config, sets)
    launcher = Proc("launch", tuple(argv), {}, f"{url(ports[0])}/v1/models")
    threads = {node: e.threads or 1 for node, e in engines.items()}
    return Setup(name, (launcher,), url(ports[0]), threads)


# --- vLLM -------------------------------------------------------------------------------------


def cores_for(threads: Sequence[int]) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND per engine: consecutive cores of this process's CPU set."""
    cpus = sorted(os.sched_getaffinity(0))
    out, start = [], 0
    for n in threads:
        chosen = [cpus[(start + i) % len(cpus)] for i in range(n)]
        out.append(",".join(map(str, chosen)))
        start += n
    return out


def kv_cache_gib(common: Common, engine: EngineOptions) -> int:
    """VLLM_CPU_KVCACHE_SPACE (whole GiB) holding at least pdserve's `max_total_tokens`."""
    return max(1, math.ceil(engine.max_total_tokens * common.kv_bytes_per_token / 2**30))


def vllm_argv(common: Common, port: int, engine: EngineOptions) -> list[str]:
    argv = [*VLLM_SERVER, "--model", str(common.model_dir)]
    argv += ["--served-model-name", common.served_name, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--dtype", common.dtype, "--max-model-len", str(common.max_model_len)]
    argv += ["--max-num-seqs", str(engine.max_running)]
    argv += ["--max-num-batched-tokens", str(engine.max_batch_tokens), "--seed", str(engine.seed)]
    argv += ["--enable-prefix-caching" if common.prefix_cache else "--no-enable-prefix-caching"]
    argv += ["--disable-uvicorn-access-log"]
    return argv + (["--enforce-eager"] if common.vllm_eager else [])


def vllm_env(common: Common, cores: str, engine: EngineOptions) -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib(common, engine)),
        "VLLM_CPU_OMP_THREADS_BIND": cores,
        "OMP_NUM_THREADS": str(len(cores.split(","))),
        "HF_HUB_OFFLINE": "1",
    }


def vllm_setup(common: Common, engines: Mapping[str, EngineOptions]) -> Setup:
    (engine,) = engines.values()
    (port,) = free_ports(1)
    (cores,) = cores_for([engine.threads or 1])
    env = vllm_env(common, cores, engine)
    server = Proc("vllm", tuple(vllm_argv(common, port, engine)), env, f"{url(port)}/health")
    return Setup("vllm", (server,), url(port), {"vllm": engine.threads or 1})


def nixl_module() -> str | None:
    """The NIXL build vLLM must be pointed at as `nixl`, or None when `import nixl` works (or
    no NIXL is installed: vLLM then says "NIXL is not available" in the server log).

    NOTE: vLLM imports `nixl._api`, which only the `nixl` meta package provides; a machine with
    just a CUDA build's wheel (`nixl-cu12`, as here: its deps would pull CUDA) has the same API
    under `nixl_cu12`. The shim (write_nixl_shim) makes `nixl` that module, for vLLM only.
    """
    if importlib.util.find_spec("nixl") is not None:
        return None
    found = [m for m in ("nixl_cu12", "nixl_cu13") if importlib.util.find_spec(m) is not None]
    return found[0] if found else None


def write_nixl_shim(common: Common) -> None:
    """The `nixl` package that nixl_env puts on the vLLM servers' PYTHONPATH, when one is due."""
    if (module := nixl_module()) is None:
        return
    (common.log_dir / "nixl-shim" / "nixl").mkdir(parents=True, exist_ok=True)
    alias = [f"import sys\nimport {module}, {module}._api, {module}._bindings\n"]
    alias += [f"sys.modules[{name!r}] = {module}{suffix}\n" for name, suffix in (
        ("nixl", ""), ("nixl._api", "._api"), ("nixl._bindings", "._bindings"),
    )]  # fmt: skip
    (common.log_dir / "nixl-shim" / "nixl" / "__init__.py").write_text("".join(alias))


def nixl_env(common: Common, side_port: int) -> dict[str, str]:
    env = {
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_port),
        # NOTE: as transfer/nixl.py: UCX's IB modules on a machine without RDMA devices crash
        # the process at exit; an explicit UCX_MODULES from the caller wins.
        "UCX_MODULES": os.environ.get("UCX_MODULES", "^ib"),
    }
    if nixl_module() is not None:
        paths = [str(common.log_dir / "nixl-shim"), os.environ.get("PYTHONPATH")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env


def kv_transfer_config(threads: int) -> str:
    # NOTE: NIXL's UCX backend defaults to 4 worker threads in vLLM; one engine core gets one.
    extra = {"num_threads": threads}
    config = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
    return json.dumps({**config, "kv_connector_extra_config": extra}, separators=(",", ":"))


def vllm_pd_setup(common: Common, engines: Mapping[str, EngineOptions]) -> Setup:
    prefill, decode = engines["prefill-0"], engines["decode-0"]
    proxy_port, p_port, d_port, p_side, d_side = free_ports(5)
    p_cores, d_cores = cores_for([prefill.threads or 1, decode.threads or 1])
    procs = []
    for name, port, side, cores, engine in (
        ("vllm-prefill", p_port, p_side, p_cores, prefill),
        ("vllm-decode", d_port, d_side, d_cores, decode),
    ):
        argv = vllm_argv(common, port, engine)
        argv += ["--kv-transfer-config", kv_transfer_config(engine.threads or 1)]
        env = {**vllm_env(common, cores, engine), **nixl_env(common, side)}
        procs.append(Proc(name, tuple(argv), env, f"{url(port)}/health"))
    proxy = [sys.executable, str(PROXY), "--port", str(proxy_port)]
    proxy += ["--prefill", url(p_port), "--decode", url(d_port)]
    procs.append(Proc("proxy", tuple(proxy), {}, f"{url(proxy_port)}/health"))
    threads = {"vllm-prefill": prefill.threads or 1, "vllm-decode": decode.threads or 1}
    return Setup("vllm-1p1d", tuple(procs), url(proxy_port), threads)


def build_setups(names: Sequence[str], common: Common) -> list[Setup]:
    built: dict[str, Setup] = {}
    for name in names:
        if name in CONFIGS:
            built[name] = pdserve_setup(name, common)
            continue
        mirror = MIRRORS[name]
        sets = pdserve_overrides(common, mirror, free_ports(4))
        engines = node_engines(CONFIGS[mirror], sets)
        build = vllm_setup if name == "vllm" else vllm_pd_setup
        built[name] = build(common, engines)
    return [built[n] for n in names]
