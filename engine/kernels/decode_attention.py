"""Paged decode attention on x86 CPUs with AVX-512 (csrc/decode_attention.c), via ctypes.

The torch path gathers every decoding request's pages into one padded block and runs SDPA on
it: at decode batch sizes that is two copies of the context and a call whose fixed cost
dominates small heads. The kernel reads keys and values in place from the page pool instead,
one (request, kv head) pair per OpenMP work item.
"""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.build import avx512_float_kernels, bind

# decode_attention_*(q, k, v, pages, lens, B, Hq, Hkv, D, page_size, max_pages, scale, out,
#                    threads); see decode_attention.c
_ARGTYPES = [*[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 6, ctypes.c_float, ctypes.c_void_p]
_ARGTYPES += [ctypes.c_int64]


class DecodeAttention:
    """`out [B, Hq, D]` float32 of one query token per request against its paged context."""

    def __init__(self, lib: ctypes.CDLL, threads: int) -> None:
        self.threads = max(1, threads)
        names = ("decode_attention_f32", "decode_attention_bf16")
        self._fns = dict(zip((torch.float32, torch.bfloat16), bind(lib, names, _ARGTYPES)))

    def supports(self, cache_dtype: torch.dtype, heads: int, kv_heads: int, dim: int) -> bool:
        """Whether the kernel serves this layer (else the caller keeps torch's path)."""
        return (
            cache_dtype in self._fns
            and dim % 16 == 0
            and dim <= 256
            and heads % kv_heads == 0
            and heads // kv_heads <= 16
        )

    def __call__(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        pages: torch.Tensor,
        lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q [B, Hq, D]; k/v_buffer one layer's [pages, Hkv, page_size, D] (contiguous,
        head-major pages); pages int64 [B, max_pages]; lens int64 [B] (context length, this
        token included)."""
        batch, heads, dim = q.shape
        _, kv_heads, page_size, _ = k_buffer.shape
        q = q.float().contiguous()
        out = torch.empty_like(q)
        args = (q.data_ptr(), k_buffer.data_ptr(), v_buffer.data_ptr(), pages.data_ptr())
        args += (lens.data_ptr(), batch, heads, kv_heads, dim, page_size, pages.shape[1], scale)
        code = self._fns[k_buffer.dtype](*args, out.data_ptr(), self.threads)
        if code:
            raise RuntimeError(f"decode attention kernel failed (code {code})")
        return out


def build_decode_attention(threads: int = 1) -> DecodeAttention | None:
    """The native decode attention, or None (reason logged) where it cannot run."""
    lib = avx512_float_kernels("CPU decode attention kernel")
    return None if lib is None else DecodeAttention(lib, threads)
