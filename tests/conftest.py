"""Shared fixtures: tiny random-weight checkpoints (written once per session) and their tokenizers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter (set before triton loads);
    # on a GPU machine they run natively and the interpreter's tests skip
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.tokenizer import load_tokenizer
from modelgen.make import make_model


def _cache_key(arch: str, tokenizer: str, kw: dict[str, Any]) -> str:
    # NOTE: JSON so that dict arguments (rope_scaling) are hashable and order-independent.
    return json.dumps({"arch": arch, "tokenizer": tokenizer, **kw}, sort_keys=True, default=repr)


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_tiny(arch="llama", tokenizer="qwen", **make_model_kwargs) -> Path`.

    Writes a tiny HF checkpoint with `modelgen.make.make_model` the first time a combination
    of arguments is asked for, and returns the same directory afterwards. Treat it as read-only:
    it is shared by every test of the session.
    """
    written: dict[str, Path] = {}

    def make(arch: str = "llama", tokenizer: str = "qwen", **kw: Any) -> Path:
        key = _cache_key(arch, tokenizer, kw)
        if key not in written:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{tokenizer}")
            written[key] = make_model(arch, out, tokenizer=tokenizer, **kw)
        return written[key]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: a second intra-op thread only spins against the other jobs on the 2 cores
    (greedy generate ran 10x slower with 2 threads on a busy machine). A module takes it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer(make_tiny: Callable[..., Path]) -> Callable[[str], Any]:
    """`tiny_tokenizer("qwen" | "deepseek")`: the HF tokenizer of a tiny checkpoint, loaded once.

    Shared by the session: do not change its settings.
    """
    loaded: dict[str, Any] = {}

    def get(name: str = "qwen") -> Any:
        if name not in loaded:
            loaded[name] = load_tokenizer(make_tiny("llama", tokenizer=name))
        return loaded[name]

    return get


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-marked tests skip, saying why, where torch sees no CUDA GPU (CI, this machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
