"""scripts/gpu_check.sh plans its steps on any machine (`--dry-run`: nothing runs), and on a
machine without CUDA it skips what needs a GPU, saying so, rather than failing."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.e2e.cluster_util import REPO

STEPS = ["env", "gpu-tests", "kernels", "model", "offline", "serve"]


def gpu_check(*args: str) -> tuple[list[str], dict]:
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_dry_run_plans_every_step_and_runs_none() -> None:
    lines, report = gpu_check("--dry-run")
    assert report["dry_run"] is True
    assert list(report["steps"]) == STEPS
    assert all(s["status"] == "planned" for s in report["steps"].values())
    assert [line.split(":")[0] for line in lines[:-1]] == [f"[plan] {s}" for s in STEPS]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs every step")
def test_without_a_gpu_only_the_environment_step_runs() -> None:
    _, report = gpu_check("--budget-s", "60")
    steps = report["steps"]
    assert steps["env"]["status"] == "ok" and steps["env"]["gpus"] == 0
    assert all(steps[s] == {"status": "skipped", "why": "no CUDA GPU"} for s in STEPS[1:])


def test_every_gpu_marked_test_is_where_the_check_runs_them() -> None:
    """The check runs `pytest -m gpu` over GPU_TESTS only (the rest of tests/ imports test-only
    packages a GPU machine lacks), so a GPU test written elsewhere would never run: none is."""
    import ast
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check import GPU_TESTS

    marked = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "gpu":
                base = node.value
                if isinstance(base, ast.Attribute) and base.attr == "mark":
                    marked.add(path.relative_to(REPO).as_posix())
    assert "tests/gpu/test_cuda_engine.py" in marked  # the scan finds marks
    covered = [m for m in marked if any(m == g or m.startswith(g + "/") for g in GPU_TESTS)]
    assert sorted(covered) == sorted(marked)


def test_the_offline_and_roofline_measures_run_end_to_end_on_cpu(make_tiny) -> None:
    """gpu_roofline's code (what the GPU check's offline step runs) on a tiny model on CPU, so
    a slip in it costs no GPU time: every measure is there and sane."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_roofline import offline_and_roofline

    full = {"prompts": 6, "max_running": 4, "input_len": 8, "output_len": 5}
    result = offline_and_roofline(
        make_tiny("llama"), "torch", (1, 2), 8, 4, full=full, device="cpu"
    )
    assert set(result["output_tok_s"]) == {"1", "2"}
    assert all(v > 0 for v in result["output_tok_s"].values())
    assert result["decode_step_ms"] > 0 and result["roofline_ms"] > 0
    ratio = result["decode_step_ms"] / result["roofline_ms"]
    assert result["x_roofline"] == pytest.approx(ratio, rel=0.01, abs=0.01)
    assert result["saturated"]["output_tok_s"] > 0 and result["saturated"]["prompts"] == 6


def test_the_serve_step_runs_a_node_under_bench_on_cpu(make_tiny, monkeypatch) -> None:
    """gpu_check's serve step (a decode node serving `pdserve bench`) on a tiny model on CPU:
    the node comes up, the bench completes every request, its numbers come back."""
    import argparse
    import sys

    from tests.ports import free_port

    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    for name, value in (("SERVE_PROMPTS", 6), ("INPUT_LEN", 12), ("OUTPUT_LEN", 4)):
        monkeypatch.setattr(gpu_check, name, value)
    args = argparse.Namespace(
        model=str(make_tiny("llama")), port=free_port(), backend="torch", device="cpu"
    )
    result = gpu_check.step_serve(args)
    assert result["rc"] == 0, result["tail"]
    assert result["result"]["completed"] == 6
    assert result["result"]["output_throughput"] > 0
