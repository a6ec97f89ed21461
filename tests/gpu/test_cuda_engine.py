"""The engine on CUDA (GPU-marked: skipped without a GPU; scripts/gpu_check.sh runs them):
greedy tokens and prefill logits equal transformers' for Llama and DeepSeek-V3 in float32
(torch and triton), bf16 logits as close to float32 transformers as its own bf16 run (every
installed backend, FlashInfer's only dtypes), and every backend equals the torch backend at real
layer shapes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.e2e.cluster_util import REPO
from tests.test_deepseek import VOCAB as DEEPSEEK_VOCAB
from tests.test_engine_oracle import GREEDY, assert_matches_hf, new_llm, random_prompts

pytestmark = pytest.mark.gpu

BACKENDS = ["torch", "triton", "flashinfer"]


def installed(backend: str) -> None:
    if backend != "torch" and importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")


@pytest.mark.parametrize("backend", ["torch", "triton"])  # FlashInfer: bf16 only, below
@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_greedy_on_cuda_equals_transformers(make_tiny, arch: str, backend: str) -> None:
    installed(backend)
    deepseek = arch == "deepseek_v3"
    path = make_tiny(arch, "deepseek" if deepseek else "qwen", layers=3)
    prompts = random_prompts([1, 5, 37, 130], DEEPSEEK_VOCAB if deepseek else 151936, seed=3)
    llm = new_llm(path, device="cuda", attention_backend=backend)
    assert_matches_hf(path, prompts, llm.generate(prompts, GREEDY))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_bf16_on_cuda_is_as_close_to_float32_as_transformers_bf16(
    make_tiny, arch: str, backend: str
) -> None:
    """bf16 on the GPU, long prompts included (tests/test_bf16_oracle.py, on CUDA)."""
    from tests.test_bf16_oracle import assert_bf16_close

    installed(backend)
    deepseek = arch == "deepseek_v3"
    path = make_tiny(arch, "deepseek" if deepseek else "qwen", layers=3)
    assert_bf16_close(str(path), device="cuda", attention_backend=backend)


def test_backends_equal_torch_at_real_shapes() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/gpu_kernels.py"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_weights_drawn_on_cuda_are_seeded_and_shaped_as_on_cpu(tmp_path) -> None:
    """`make_model(init_device="cuda")` (how gpu_check.sh draws its 8B-shaped checkpoint fast):
    the same tensors, shapes and dtypes as the CPU's draw, equal bytes for equal seeds."""
    from safetensors.torch import load_file

    from modelgen.make import make_model

    paths = {
        name: make_model("llama", tmp_path / name, dtype="bfloat16", seed=seed, init_device=dev)
        for name, seed, dev in (("cpu", 1, "cpu"), ("cuda", 1, "cuda"), ("again", 1, "cuda"))
    }
    weights = {name: load_file(path / "model.safetensors") for name, path in paths.items()}
    cpu, cuda, again = weights["cpu"], weights["cuda"], weights["again"]
    assert {n: (t.shape, t.dtype) for n, t in cuda.items()} == {
        n: (t.shape, t.dtype) for n, t in cpu.items()
    }
    assert all(t.equal(again[n]) for n, t in cuda.items())
    assert not all(t.equal(cpu[n]) for n, t in cuda.items())  # drawn on the GPU indeed
