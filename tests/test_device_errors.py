"""GPU-only choices on a machine that cannot honour them fail at load, naming the fix:
`device: cuda` without a usable GPU, and `attention_backend: flashinfer` off CUDA or without
FlashInfer installed. Through the offline API and the `pdserve generate` command."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from engine.layers.attention.flashinfer_backend import import_flashinfer
from engine.llm import LLM
from tests.e2e.cluster_util import REPO

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@no_gpu
def test_cuda_without_a_gpu_is_refused_at_load(make_tiny) -> None:
    with pytest.raises(ValueError, match=r"cannot use CUDA.*set engine\.device: cpu"):
        LLM(str(make_tiny("llama")), device="cuda")


@no_gpu
def test_flashinfer_off_cuda_is_refused_at_load(make_tiny) -> None:
    with pytest.raises(ValueError, match=r"'flashinfer' runs on CUDA only.*'torch'"):
        LLM(str(make_tiny("llama")), attention_backend="flashinfer")


@pytest.mark.skipif(
    importlib.util.find_spec("flashinfer") is not None, reason="FlashInfer is installed"
)
def test_flashinfer_not_installed_says_how_to_get_it() -> None:
    with pytest.raises(ValueError, match="pip install flashinfer-python"):
        import_flashinfer()


@no_gpu
def test_generate_command_says_why_and_exits_non_zero(make_tiny) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", str(make_tiny("llama")),
         "--prompt", "Hi", "--attention-backend", "flashinfer"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "runs on CUDA only" in done.stderr
    assert "Traceback" not in done.stderr


def test_flashinfer_takes_half_precision_only() -> None:
    """A float32 model with FlashInfer is refused at load (its kernels take fp16/bf16: the
    first step would fail), naming the dtype to set."""
    from engine.layers.attention.flashinfer_backend import check_dtype

    check_dtype(torch.bfloat16)
    check_dtype(torch.float16)
    with pytest.raises(ValueError, match=r"is float32: set engine\.dtype: bfloat16"):
        check_dtype(torch.float32)
