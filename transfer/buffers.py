"""KV buffers as the transfer layer sees them: (base pointer, bytes per page, stride), and the
memory ranges an engine registers to cover them. No model, no engine: plain addresses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KVBuffer:
    """One buffer holding one slice of every page, e.g. one layer's K, V or MLA latent.

    Page ``p`` lives at ``base_ptr + p * stride`` and is ``page_bytes`` long. ``page_stride``
    defaults to ``page_bytes`` (pages back to back, as in a layer-major pool); a page-major pool
    can instead register one buffer whose page covers every layer, or one view per layer with a
    stride of the whole page.
    """

    base_ptr: int
    page_bytes: int
    num_pages: int
    page_stride: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.page_bytes <= 0 or self.num_pages <= 0:
            raise ValueError(f"KVBuffer needs page_bytes > 0 and num_pages > 0, got {self}")
        if self.page_stride and self.page_stride < self.page_bytes:
            raise ValueError(f"page_stride {self.page_stride} < page_bytes {self.page_bytes}")

    @property
    def stride(self) -> int:
        return self.page_stride or self.page_bytes

    @property
    def span(self) -> tuple[int, int]:
        """The [start, end) address range this buffer touches."""
        return self.base_ptr, self.base_ptr + (self.num_pages - 1) * self.stride + self.page_bytes

    @classmethod
    def from_desc(
        cls, base_ptr: int, nbytes: int, page_bytes: int, device: str = "cpu"
    ) -> KVBuffer:
        """A packed buffer from (base pointer, total bytes, bytes per page)."""
        return cls(base_ptr, page_bytes, nbytes // page_bytes, 0, device)

    @classmethod
    def from_array(cls, array: Any) -> KVBuffer:
        """View a numpy array or torch tensor whose first dimension is the page index."""
        if hasattr(array, "data_ptr"):  # torch.Tensor, without importing torch
            itemsize = array.element_size()
            page_bytes = array[0].numel() * itemsize
            stride = array.stride(0) * itemsize
            return cls(array.data_ptr(), page_bytes, array.shape[0], stride, str(array.device))
        return cls(array.ctypes.data, array[0].nbytes, array.shape[0], array.strides[0])


@dataclass(frozen=True)
class MemoryRegion:
    """A contiguous range handed to the transfer engine for registration."""

    base_ptr: int
    length: int
    device: str = "cpu"


def regions_for(buffers: Sequence[KVBuffer]) -> list[MemoryRegion]:
    """Registration ranges covering every buffer; overlapping views are merged, and touching
    ones on CPU. Touching GPU buffers stay apart: two allocations may sit back to back there,
    and a registration across both is one that GPU-direct memory registration may refuse."""
    spans = sorted((*b.span, b.device) for b in buffers)
    merged: list[list[Any]] = []
    for start, end, device in spans:
        last = merged[-1] if merged else None
        touch_ok = device == "cpu"
        if last and device == last[2] and (start < last[1] or (start == last[1] and touch_ok)):
            last[1] = max(last[1], end)
        else:
            merged.append([start, end, device])
    return [MemoryRegion(s, e - s, d) for s, e, d in merged]
