"""Exact greedy argmax through an int8 pre-pass (csrc/lm_head_q8.c, AVX512-VNNI).

The LM head of a small model at decode batch sizes is bound by multiply work, not memory:
`[16, 64] x [64, 152k]` is 155M multiply-adds a step. One VNNI instruction does 64 int8
multiply-adds where a float32 FMA does 16 (and a bfloat16 dot 32), so the int8 pass costs a
quarter of the float32 kernel's work. It stays exact: int8 logits come with a rigorous error
bound (see lm_head_q8.c), only indices within it of the row's best can be the argmax, and those
few are recomputed with the float kernel's own code. The result is the index the float kernel's
argmax returns, bit for bit, ties included.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch

from engine.kernels.build import CFLAGS, bind, compile_library, cpu_flags

log = logging.getLogger(__name__)

Q8_CFLAGS = (*CFLAGS, "-mavx512bw", "-mavx512vnni")
Q8_CPU_FLAGS = ("avx512bw", "avx512_vnni")
# q8_argmax_*(x, rows, M, ldx, K, packed, V, q8_packed, Kp, scale, err_max, norm_max, eps_rel,
#             mt, threads, out); see lm_head_q8.c
_ARGTYPES = [ctypes.c_void_p, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int64]
_ARGTYPES += [ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_double] * 4]
_ARGTYPES += [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
BLOCK = 16
Q8_MAX_HIDDEN = 32768  # int32 sums of int8 products cannot overflow below this (lm_head_q8.c)
CHUNK_ROWS = 8192  # vocabulary rows quantized at a time (bounds the float64 temporaries)


@dataclass(frozen=True)
class Q8Weight:
    """The LM head weight as int8 with one scale, packed for q8_scan, and the bound's terms."""

    packed: torch.Tensor  # uint8 [blocks, Kp / 4, 16, 4] = wq + 128
    scale: float  # w ~ scale * wq
    err_max: float  # max over rows of |w - scale * wq|
    norm_max: float  # max over rows of |scale * wq|
    eps_rel: float  # the float kernel's own summation error, relative to |x| |w|
    hidden_padded: int


def q8_library() -> ctypes.CDLL | None:
    """The int8 argmax library, or None (reason logged) where the CPU lacks VNNI."""
    missing = [f for f in Q8_CPU_FLAGS if f not in cpu_flags()]
    if missing:
        log.info("int8 greedy LM head off: this CPU lacks %s", ", ".join(missing))
        return None
    lib = ctypes.CDLL(str(compile_library("lm_head_q8", Q8_CFLAGS)))
    bind(lib, ("q8_argmax_f32", "q8_argmax_bf16"), _ARGTYPES)
    return lib


def quantize_weight(weight: torch.Tensor) -> Q8Weight:
    vocab, hidden = weight.shape
    kp = -(-hidden // 4) * 4
    blocks = -(-vocab // BLOCK)
    amax = float(weight.abs().max().float())
    scale = amax / 127.0 if amax > 0 else 1.0
    q = torch.zeros(blocks * BLOCK, kp, dtype=torch.int16)
    err_max = norm_max = 0.0
    for start in range(0, vocab, CHUNK_ROWS):
        w = weight[start : start + CHUNK_ROWS].double()
        rows = torch.clamp(torch.round(w / scale), -127, 127)
        q[start : start + len(w), :hidden] = rows.to(torch.int16)
        err_max = max(err_max, float((w - scale * rows).norm(dim=1).max()))
        norm_max = max(norm_max, float((scale * rows).norm(dim=1).max()))
    packed = (q + 128).to(torch.uint8).view(blocks, BLOCK, kp // 4, 4).transpose(1, 2)
    # a float32 (or bf16-pair) dot of length K rounds at most K times: 2 K u bounds it generously
    eps_rel = 2.0 * hidden * 2.0**-24
    return Q8Weight(
        packed.contiguous(), scale, err_max * (1 + 1e-6), norm_max * (1 + 1e-6), eps_rel, kp
    )


class Q8Argmax:
    """Greedy argmax of `x @ weight.T` for the float kernel whose packed weight is `exact`."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor, exact: torch.Tensor) -> None:
        self.vocab, self.hidden = weight.shape
        self.q8 = quantize_weight(weight)
        self.exact = exact
        self._fn = lib.q8_argmax_bf16 if weight.dtype == torch.bfloat16 else lib.q8_argmax_f32

    def __call__(
        self,
        x: torch.Tensor,
        rows: int,
        tile: int,
        threads: int,
        out: int,
        allowed: torch.Tensor | None = None,
    ) -> int:
        """Rows [0, rows) of `x` [M, K] (contiguous, the weight's dtype, M a multiple of
        `tile`) into the int32 buffer at `out`; the kernel's return code. `allowed`: an int32
        bitmask [M, ceil(V / 32)] (bit v: token v may be picked), or None for every token."""
        q8 = self.q8
        args = (x.data_ptr(), rows, x.shape[0], self.hidden, self.hidden, self.exact.data_ptr())
        args += (self.vocab, q8.packed.data_ptr(), q8.hidden_padded, q8.scale, q8.err_max)
        mask = (None, 0) if allowed is None else (allowed.data_ptr(), allowed.shape[1])
        return self._fn(*args, q8.norm_max, q8.eps_rel, tile, threads, *mask, out)
