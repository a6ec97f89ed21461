"""RMSNorm and SiLU-and-mul of bfloat16 rows in one pass each (csrc/norm_act.c), via ctypes.

Torch's ops make several passes over a bfloat16 prefill's activations (float32 copies, the
square, the mean, the casts); on the mid-size model of docs/BENCHMARKS.md, a [4096, 1024] norm
took 1.66 ms that the kernel does in 0.47, and SiLU-and-mul over [4096, 2 x 3072] 4.4 ms against
3.3 (that one reads and writes memory at its rate). The math and its bfloat16 roundings are the
reference implementations' (csrc/norm_act.c says where a result may differ by one step).
"""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.build import avx512_float_kernels, bind

_SILU_MUL_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
_RMS_NORM_ARGS = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 2, ctypes.c_float]
_RMS_NORM_ARGS += [ctypes.c_void_p, ctypes.c_int64]


class NormAct:
    """bfloat16 `rms_norm` and `silu_mul` on the CPU; `serves_*` say when (else torch's ops)."""

    def __init__(self, lib: ctypes.CDLL, threads: int) -> None:
        self.threads = max(1, threads)
        (self._silu_mul,) = bind(lib, ("silu_mul_bf16",), _SILU_MUL_ARGS)
        (self._rms_norm,) = bind(lib, ("rms_norm_bf16",), _RMS_NORM_ARGS)

    @staticmethod
    def _serves(x: torch.Tensor, width: int) -> bool:
        return (
            x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.is_contiguous()
            and width % 16 == 0
            and x.numel() > 0
        )

    def serves_norm(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return self._serves(x, x.shape[-1]) and weight.dtype == torch.bfloat16

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """HF's RMSNorm of x's last dimension (x bfloat16, contiguous; `serves_norm`)."""
        width = x.shape[-1]
        out = torch.empty_like(x)
        rows = x.numel() // width
        code = self._rms_norm(
            x.data_ptr(), weight.data_ptr(), rows, width, eps, out.data_ptr(), self.threads
        )
        if code:
            raise RuntimeError(f"rms_norm kernel failed (code {code})")
        return out

    def serves_silu_mul(self, gate_up: torch.Tensor) -> bool:
        return self._serves(gate_up, gate_up.shape[-1] // 2) and gate_up.shape[-1] % 2 == 0

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of rows [gate | up] (bfloat16, contiguous; `serves_silu_mul`)."""
        half = gate_up.shape[-1] // 2
        out = gate_up.new_empty((*gate_up.shape[:-1], half))
        rows = gate_up.numel() // gate_up.shape[-1]
        code = self._silu_mul(gate_up.data_ptr(), rows, half, out.data_ptr(), self.threads)
        if code:
            raise RuntimeError(f"silu_mul kernel failed (code {code})")
        return out


def build_norm_act(threads: int = 1) -> NormAct | None:
    """The native norm and activation, or None (reason logged) where they cannot run."""
    lib = avx512_float_kernels("CPU norm/activation kernels")
    return None if lib is None else NormAct(lib, threads)
