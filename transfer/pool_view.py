"""An engine's KV page pool as the transfer layer sees it.

The pool is duck-typed (transfer does not import engine): it needs `buffers()` (tensors whose
first dimension is the page), `page_size`, and `layout` with `dtype`, `num_layers`, `kind`.
"""

from __future__ import annotations

from typing import Any

from .base import KVBuffer
from .compat import KVCompat


def pool_view(pool: Any, model: str) -> tuple[list[KVBuffer], KVCompat]:
    """The pool's buffers and what a peer must agree on to exchange pages with it."""
    buffers = [KVBuffer.from_array(b) for b in pool.buffers()]
    compat = KVCompat(
        model=model,
        dtype=str(pool.layout.dtype).removeprefix("torch."),
        page_size=pool.page_size,
        num_layers=pool.layout.num_layers,
        kv_layout=pool.layout.kind,
    )
    return buffers, compat
