"""What a GPU machine can tell us, in one run of under 8 minutes from a clean copy of the repo:

1. env        torch/CUDA/GPU, and which of triton, flashinfer, transformers are there
2. gpu-tests  the GPU-marked tests (`pytest -m gpu`)
3. kernels    each attention backend (triton, flashinfer where installed) against the torch
              backend on CUDA at real shapes: Llama-3.1-8B's GQA layer, DeepSeek-V3's MLA
4. model      a random-weight Llama-3.1-8B-shaped checkpoint, generated on the spot (cached)
5. offline    output tokens/s at batch 1, 16 and 64 through `LLM`, and at batch 64 the decode
              step time beside its memory roofline (weight and KV bytes read per step over the
              GPU's measured copy bandwidth)
6. serve      a colocated node of that model serving `pdserve bench`

Steps that cannot run (no GPU, a package missing) say so and are skipped; a failing step is
recorded and the rest go on. `--dry-run` prints the plan only (it runs on CPU, in CI). The last
printed line is JSON.

    bash scripts/gpu_check.sh [--dry-run] [--budget-s 480] [--backend triton]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LLAMA_8B = {  # Llama-3.1-8B's shape (the vocabulary is the generated tokenizer's)
    "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336,
}  # fmt: skip
GPU_TESTS = (
    "tests/gpu",
    "tests/transfer/test_transfer_nccl.py",
    "tests/transfer/test_transfer_vram.py",
)
"""Where the GPU-marked tests live (pytest over all of tests/ would import test-only packages
that a GPU machine lacks)."""
BATCHES = (1, 16, 64)
INPUT_LEN, OUTPUT_LEN = 256, 64
SERVE_PROMPTS = 128


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip steps past this")
    p.add_argument("--backend", default="", help="attention backend (default: best installed)")
    p.add_argument("--model", help="an existing checkpoint instead of the generated one")
    p.add_argument("--port", type=int, default=30123, help="the colocated node's port")
    return p.parse_args()


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def best_backend(args: argparse.Namespace) -> str:
    if args.backend:
        return args.backend
    return "flashinfer" if has("flashinfer") else "triton" if has("triton") else "torch"


def model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    cache = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    return cache / "models" / "gpu-check-llama-3.1-8b-shape-bf16"


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A subprocess's exit code and output tail; its last line parsed when it is JSON."""
    done = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    out: dict[str, Any] = {"rc": done.returncode, "tail": (done.stdout + done.stderr)[-1500:]}
    with contextlib.suppress(json.JSONDecodeError):
        out["result"] = json.loads(lines[-1]) if lines else None
    return out


# ---- the steps ---------------------------------------------------------------------------------


def step_env(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        **{name: has(name) for name in ("triton", "flashinfer", "transformers")},
        "backend": best_backend(args),
    }


def step_gpu_tests(args: argparse.Namespace) -> dict[str, Any]:
    pytest = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    # NOTE: the kernels step runs gpu_kernels.py and keeps its numbers; its test would run it twice
    same = "tests/gpu/test_cuda_engine.py::test_backends_equal_torch_at_real_shapes"
    return run([*pytest, *GPU_TESTS, "--deselect", same], 240)


def step_kernels(args: argparse.Namespace) -> dict[str, Any]:
    return run([sys.executable, "scripts/gpu_kernels.py"], 240)


def step_model(args: argparse.Namespace) -> dict[str, Any]:
    out = model_dir(args)
    if (out / "config.json").is_file():
        return {"path": str(out), "cached": True}
    import torch

    from modelgen.make import make_model

    make_model("llama", out, dtype="bfloat16", init_device="cuda", **LLAMA_8B)
    torch.cuda.empty_cache()  # the draws' blocks, for the steps after
    return {"path": str(out), "cached": False}


def step_offline(args: argparse.Namespace) -> dict[str, Any]:
    import gc

    import torch
    from gpu_roofline import offline_and_roofline

    try:
        return offline_and_roofline(
            model_dir(args), best_backend(args), BATCHES, INPUT_LEN, OUTPUT_LEN
        )
    finally:  # NOTE: the serve step's node sizes its KV pool from what this process leaves free
        gc.collect()
        torch.cuda.empty_cache()


BENCH_KEYS = (
    "completed", "output_throughput", "request_throughput", "mean_ttft_ms", "median_ttft_ms",
    "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2e_latency_ms",
)  # fmt: skip


def bench_record(path: Path) -> dict[str, Any]:
    """The bench run's headline numbers, from the JSONL line it appended."""
    if not path.is_file():
        return {}
    record = json.loads(path.read_text().strip().splitlines()[-1])
    return {"result": {k: record[k] for k in BENCH_KEYS if k in record}}


def step_serve(args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    record = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "bench.jsonl"
    device = getattr(args, "device", "cuda")  # cpu: tests check this step's code on a tiny model
    dtype = "bfloat16" if device == "cuda" else "float32"
    node = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "decode", "--model", str(model_dir(args)),
         "--port", str(args.port), "--transfer-backend", "none",
         "--engine-opt", f"device={device}", "--engine-opt", f"dtype={dtype}",
         "--engine-opt", f"attention_backend={best_backend(args)}",
         "--engine-opt", "max_running=64"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_healthy(url, node, 240)
        bench = [sys.executable, "-m", "cluster.cli", "bench", "--backend", "sglang",
                 "--base-url", url, "--dataset-name", "random", "--num-prompts", str(SERVE_PROMPTS),
                 "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
                 "--random-range-ratio", "1", "--max-concurrency", "64", "--disable-tqdm",
                 "--output-file", str(record)]  # fmt: skip
        return {**run(bench, 240), **bench_record(record)}
    finally:
        node.terminate()
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()


def wait_healthy(url: str, node: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"the node exited {node.returncode}: {node.stderr.read()[-1500:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy within {timeout_s:g}s")


Step = tuple[str, Callable[[argparse.Namespace], dict[str, Any]], str, tuple[str, ...]]
STEPS: list[Step] = [  # (name, function, what it runs, what it needs)
    ("env", step_env, "torch, CUDA and package versions", ()),
    ("gpu-tests", step_gpu_tests, f"pytest -q -m gpu {' '.join(GPU_TESTS)}", ("cuda",)),
    ("kernels", step_kernels, "python scripts/gpu_kernels.py (backends vs torch, real shapes)",
     ("cuda",)),
    ("model", step_model, "make_model('llama', bf16, 8B shape, drawn on the GPU), cached",
     ("cuda",)),
    ("offline", step_offline,
     f"LLM tok/s at batch {'/'.join(map(str, BATCHES))}; decode step vs memory roofline",
     ("cuda",)),
    ("serve", step_serve, f"pdserve decode --transfer-backend none + pdserve bench ({SERVE_PROMPTS} prompts)",
     ("cuda",)),
]  # fmt: skip


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    report: dict[str, Any] = {"dry_run": args.dry_run, "steps": {}}
    cuda = False
    if not args.dry_run:
        import torch

        cuda = torch.cuda.is_available()
    for name, fn, what, needs in STEPS:
        if args.dry_run:
            print(f"[plan] {name}: {what}", flush=True)
            report["steps"][name] = {"status": "planned", "runs": what}
            continue
        elapsed = time.monotonic() - started
        if "cuda" in needs and not cuda:
            report["steps"][name] = {"status": "skipped", "why": "no CUDA GPU"}
        elif elapsed > args.budget_s:
            report["steps"][name] = {"status": "skipped", "why": f"budget spent ({elapsed:.0f}s)"}
        else:
            t0 = time.monotonic()
            try:
                result = fn(args)
                ok = result.get("rc", 0) == 0
                report["steps"][name] = {"status": "ok" if ok else "failed", **result}
            except Exception as exc:  # recorded; the next steps still run
                report["steps"][name] = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                }
            report["steps"][name]["seconds"] = round(time.monotonic() - t0, 1)
        print(f"[{report['steps'][name]['status']}] {name}", flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
