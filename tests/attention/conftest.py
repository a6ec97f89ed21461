"""Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; with one, the
same tests run the compiled kernels on CUDA (the `device` fixture follows what the kernels chose).

NOTE: `@triton.jit` picks the interpreter when a kernel is defined, so TRITON_INTERPRET must be
set before a kernel module (engine/kernels/triton/) is imported: here, at this conftest's import,
before pytest collects the tests beside it. An explicit TRITON_INTERPRET wins either way.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> str:
    """cpu under the interpreter; cuda when the kernels were compiled."""
    from engine.kernels.triton.common import interpreted

    if interpreted():
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("the Triton kernels are compiled (TRITON_INTERPRET unset) and there is no GPU")
    return "cuda"
