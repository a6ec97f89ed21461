"""What the Triton kernels share: how a paged buffer is addressed, block sizes, and the dot product.

A paged buffer (engine/kv/pool.py) is seen through element strides of a page, a KV head and a
token slot, so one kernel reads both layouts:

    MHA  [pages, kv_heads, page_size, head_dim]:  stride_head = page_size * head_dim
    MLA  [pages, page_size, latent_dim]:          stride_head = 0 (one shared latent head)

    element (page, head, offset, d) = page * stride_page + head * stride_head
                                      + offset * stride_tok + d
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MIN_DOT = 16
"""tl.dot on a GPU wants every block dimension >= 16."""
LOG2E = 1.4426950408889634
"""Scores are kept in log2 units (exp2 is the cheap exponential on a GPU)."""


@dataclass(frozen=True)
class StepTables:
    """A step's requests as the attention kernels read them (int32, on the pool's device).

    Request r's new tokens are q rows [q_starts[r], q_starts[r] + q_lens[r]), at sequence
    positions [kv_lens[r] - q_lens[r], kv_lens[r]); page_tables[r] lists its pages (padded with
    the padding page 0).
    """

    page_tables: torch.Tensor  # [R, max_pages]
    q_starts: torch.Tensor  # [R]
    q_lens: torch.Tensor  # [R]
    kv_lens: torch.Tensor  # [R]


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged buffer and the strides (in elements) the kernels address it by."""

    buffer: torch.Tensor
    heads: int
    page_size: int
    stride_page: int
    stride_head: int
    stride_tok: int

    @classmethod
    def mha(cls, buffer: torch.Tensor) -> PagedKV:
        """A K or V buffer, [pages, kv_heads, page_size, head_dim]."""
        _check_rows(buffer)
        heads, page_size = buffer.shape[1], buffer.shape[2]
        return cls(buffer, heads, page_size, *buffer.stride()[:3])

    @classmethod
    def mla(cls, buffer: torch.Tensor) -> PagedKV:
        """A latent buffer, [pages, page_size, kv_lora_rank + rope_dim]."""
        _check_rows(buffer)
        return cls(buffer, 1, buffer.shape[1], buffer.stride(0), 0, buffer.stride(1))


def _check_rows(buffer: torch.Tensor) -> None:
    if buffer.stride(-1) != 1:
        raise ValueError("a paged KV buffer needs contiguous rows (stride 1 in its last dim)")


def rows(t: torch.Tensor) -> torch.Tensor:
    """`t` with stride 1 in its last dim (what the kernels' row loads assume); a view if it has."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dot_block(n: int) -> int:
    """A power-of-two block dimension covering `n` that tl.dot takes on a GPU."""
    return max(MIN_DOT, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots in full precision (a GPU's default, tf32, is ~1e-3 off); others as given."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether dots take float32 operands instead of `dtype` ones.

    NOTE: Triton 3.9's interpreter multiplies bfloat16 dot operands as their raw uint16 bits
    (numbers ~1e10 off). Under the interpreter the kernels upcast bfloat16 operands first: the
    same math, since a product of two bfloat16 values is exact in float32 and GPU dots accumulate
    in float32 too. On a GPU this is False and the dots stay bfloat16.
    """
    return dtype == torch.bfloat16 and interpreted()


def interpreted() -> bool:
    """Whether this process runs the kernels in Triton's interpreter (on CPU tensors).

    Fixed when the kernels were defined: `@triton.jit` reads TRITON_INTERPRET then.
    """
    return isinstance(dot, InterpretedFunction)


def compiles_only() -> bool:
    """Whether kernel launches only compile for a GPU (engine/kernels/triton/compile_only.py),
    so tensors of any device may stand in for the GPU's."""
    from triton.runtime.driver import driver

    from engine.kernels.triton.compile_only import CompileOnlyDriver

    return isinstance(driver._active, CompileOnlyDriver)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in float32 (see `upcast_dots` for UPCAST)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def slot_offsets(table, pos, mask, PAGE_SIZE: tl.constexpr, stride_page, stride_tok):
    """Element offsets (int64) of sequence positions `pos` of the request whose page-table row
    `table` points at (its head 0); masked positions read the padding page."""
    page = tl.load(table + pos // PAGE_SIZE, mask=mask, other=0)
    return page.to(tl.int64) * stride_page + (pos % PAGE_SIZE) * stride_tok


@triton.jit
def softmax_step(scores, v, m_i, l_i, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One block of online softmax: scores [M, N] (log2 units, -inf where hidden), v [N, DV].

    Every row must see at least one key in its first block (m_i starts at -inf)."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc
