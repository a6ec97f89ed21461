"""The LM head on x86 CPUs with AVX-512: csrc/lm_head.c, via ctypes.

Why: at decode batch sizes the LM head is most of a small model's step, and torch's CPU matmuls
reach well under half of this machine's AVX-512 rate on its skinny shape (`[16, hidden] x
[hidden, 152k]`). The kernel streams a weight packed once at load through 16 accumulators and
writes float32 logits directly: 2.4x faster than `F.linear` in bfloat16 and 3-4x in float32 on
the project's AMD EPYC machine. Greedy steps need only the argmax: where the CPU has VNNI an
exact int8 pre-pass (csrc/lm_head_q8.c, lm_head_q8.py) finds it with a quarter of the float32
work.

Where there is no compiler, no AVX-512, or (for bfloat16) no AVX512-BF16, `build_lm_head`
returns None with the reason logged and the model keeps torch's matmul (build.py compiles).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from engine.kernels.build import BUILD_ERRORS, bind, cpu_flags, float_kernels
from engine.kernels.lm_head_q8 import Q8_MAX_HIDDEN, Q8Argmax, q8_library

log = logging.getLogger(__name__)

BLOCK = 16  # vocabulary rows per packed block (one 512-bit register of float32)
TILES = (1, 2, 4, 8, 16)  # rows of x per pass over the weight
# lm_head_*(x, M, ldx, K, packed, V, out, ldo, out_idx, mt, threads); see lm_head.c
_ARGTYPES = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_int64]
_ARGTYPES += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
_NEEDED_FLAGS = {torch.float32: ("avx512f",), torch.bfloat16: ("avx512f", "avx512_bf16")}


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight [V, K]` in the kernel's blocked layout (see lm_head.c), rows padded with zeros."""
    vocab, hidden = weight.shape
    blocks = -(-vocab // BLOCK)
    padded = weight.new_zeros(blocks * BLOCK, hidden)
    padded[:vocab] = weight
    if weight.dtype == torch.float32:
        return padded.view(blocks, BLOCK, hidden).transpose(1, 2).contiguous()
    return padded.view(blocks, BLOCK, hidden // 2, 2).permute(0, 2, 1, 3).contiguous()


class CpuLMHead:
    """float32 logits `[M, V]` of `x [M, K] @ weight.T` through the native kernel, or greedy's
    argmax alone (through the exact int8 pre-pass where the CPU has VNNI).

    With `threads` > 1 the vocabulary blocks are split among that many OpenMP threads: torch's
    own pool, since the library binds to the libgomp torch loaded, so no second set of threads
    competes with torch's spinning workers. The calls release the GIL.
    """

    def __init__(
        self,
        lib: ctypes.CDLL,
        weight: torch.Tensor,
        threads: int = 1,
        q8_lib: ctypes.CDLL | None = None,
    ) -> None:
        self.vocab, self.hidden = weight.shape
        self.dtype = weight.dtype
        self.threads = max(1, threads)
        self.packed = pack_weight(weight.detach())
        f32, bf16 = bind(lib, ("lm_head_f32", "lm_head_bf16"), _ARGTYPES)
        self._fn = f32 if self.dtype == torch.float32 else bf16
        self.q8 = None
        if q8_lib is not None and self.hidden <= Q8_MAX_HIDDEN:
            self.q8 = Q8Argmax(q8_lib, weight.detach(), self.packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits [M, V]."""
        x, rows = self._padded(x)
        out = torch.empty(x.shape[0], self.vocab, dtype=torch.float32)
        if rows:
            self._check(self._fn(*self._head(x), out.data_ptr(), self.vocab, None, *self._split(x)))
        return out[:rows]

    @property
    def masks(self) -> bool:
        """Whether `argmax` takes a grammar's token bitmask (the int8 pass does)."""
        return self.q8 is not None

    def argmax(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's argmax over the vocabulary (the first index of the max), as int64 [M],
        without writing the logits out: greedy decoding's whole LM head. `allowed` (where
        `masks`): an int32 bitmask [M, ceil(V / 32)], each row's argmax over its allowed
        tokens only (constrained decoding)."""
        x, rows = self._padded(x)
        out = torch.empty(x.shape[0], dtype=torch.int32)  # the float path fills padding rows too
        if not rows:
            return out.long()
        if allowed is not None:
            if self.q8 is None:
                raise ValueError("a masked argmax needs the int8 pass (CpuLMHead.masks)")
            allowed = padded_mask(allowed.contiguous(), x.shape[0])
        if self.q8 is not None:
            self._check(self.q8(x, rows, *self._split(x), out.data_ptr(), allowed))
        else:
            self._check(self._fn(*self._head(x), None, 0, out.data_ptr(), *self._split(x)))
        return out[:rows].long()

    def _head(self, x: torch.Tensor) -> tuple[int, ...]:
        return (
            x.data_ptr(),
            x.shape[0],
            self.hidden,
            self.hidden,
            self.packed.data_ptr(),
            self.vocab,
        )

    def _split(self, x: torch.Tensor) -> tuple[int, int]:
        """(rows of x per pass over the weight, threads)."""
        return self._tile(x.shape[0]), self.threads

    @staticmethod
    def _check(code: int) -> None:
        if code:
            raise RuntimeError(
                f"CPU LM head kernel failed (code {code}: -1 bad arguments, -2 no memory)"
            )

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"CpuLMHead expects x [M, {self.hidden}], got {tuple(x.shape)}")
        rows = x.shape[0]
        tile = self._tile(rows)
        padded_rows = -(-rows // tile) * tile
        if padded_rows != rows or not x.is_contiguous() or x.dtype != self.dtype:
            xp = x.new_zeros(padded_rows, self.hidden, dtype=self.dtype)
            xp[:rows] = x
            x = xp
        return x, rows

    @staticmethod
    def _tile(rows: int) -> int:
        return next((t for t in TILES if t >= rows), TILES[-1])


def build_lm_head(weight: torch.Tensor, threads: int = 1) -> CpuLMHead | None:
    """The native LM head for `weight`, or None (reason logged) where it cannot run."""
    reason = lm_head_unsupported(weight)
    if reason is None:
        try:
            lib = float_kernels()
            return CpuLMHead(lib, weight, threads, q8_library())
        except BUILD_ERRORS as exc:
            reason = str(exc)
    log.info("CPU LM head kernel off, using torch's matmul: %s", reason)
    return None


def lm_head_unsupported(weight: torch.Tensor) -> str | None:
    """Why the native LM head cannot serve `weight`, or None."""
    if weight.device.type != "cpu":
        return f"the weight is on {weight.device}"
    if weight.dtype not in _NEEDED_FLAGS:
        return f"no kernel for {weight.dtype}"
    if weight.dim() != 2 or weight.shape[1] % 2:
        return f"the weight's shape {tuple(weight.shape)} is not [vocab, even hidden]"
    missing = [f for f in _NEEDED_FLAGS[weight.dtype] if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def padded_mask(allowed: torch.Tensor, rows: int) -> torch.Tensor:
    """`allowed` [M, W] with rows up to `rows` (a tile's padding rows allow every token)."""
    if allowed.dtype != torch.int32 or allowed.dim() != 2:
        raise ValueError(f"allowed must be an int32 [M, W] bitmask, got {allowed.dtype}")
    if allowed.shape[0] == rows:
        return allowed
    pad = torch.full((rows - allowed.shape[0], allowed.shape[1]), -1, dtype=torch.int32)
    return torch.cat([allowed, pad])
