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
