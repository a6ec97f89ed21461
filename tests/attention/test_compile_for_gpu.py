"""The Triton kernels compile for a Hopper GPU at real model shapes and fit its limits.

Triton's interpreter, which checks the kernels' math in CI, never asks whether a tile fits a
GPU's shared memory or registers; `scripts/gpu_compile.py` compiles the real launches (through
the triton attention backend and `fused_moe`) for sm_90 with the ptxas that ships in triton, and
checks what the CUDA runtime checks when it loads a kernel. Each run is a process of its own:
this one's kernels are interpreted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None
    or not (
        Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin/ptxas"
    ).exists(),
    reason="this triton has no NVIDIA backend with its ptxas",
)


def compile_run(args: list[str], tmp_path: Path) -> tuple[int, list[str], dict]:
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    return done.returncode, lines[:-1], json.loads(lines[-1])


def test_every_kernel_compiles_for_hopper_at_real_shapes(tmp_path: Path) -> None:
    """Llama-3.1-8B's GQA and DeepSeek-V3's MLA attention (store, extend, split decode, merge),
    and DeepSeek-V3's routed experts in bf16 and FP8 at decode and prefill sizes."""
    args = ["scripts/gpu_compile.py", "--quick", "--dtypes", "bfloat16", "--probe-refusal"]
    rc, lines, summary = compile_run(args, tmp_path)
    assert rc == 0 and summary["refused"] == [], "\n".join(lines)
    assert summary["arch"] == "sm_90"
    compiled = {r["case"].split()[0] + " " + r["kernel"] for r in summary["compiled"]}
    for kernel in ("store", "extend", "decode", "merge"):
        assert f"llama-3.1-8b {kernel}" in compiled and f"deepseek-v3 {kernel}" in compiled
    assert {"deepseek-v3 gate_up", "deepseek-v3 down"} <= compiled
    assert 0 < summary["max_shared"] <= summary["shared_limit"]
    assert 0 < summary["max_registers"] <= 255
    # what a GPU would refuse at launch is refused here: MLA decode over 256 keys a step wants a
    # 576 x 256 bf16 key tile (288 KiB) in shared memory, past Hopper's 227 KiB
    assert any("shared memory" in error for error in summary["probe"]), summary["probe"]
