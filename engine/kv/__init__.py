"""Paged KV cache: the page pool (allocator + per-layer buffers) and the radix prefix cache."""

from __future__ import annotations

from engine.kv.pool import (
    RESERVED_PAGE,
    KVLayout,
    PagePool,
    available_memory_bytes,
    head_rows,
    pages_for_budget,
    slot_indices,
)
from engine.kv.radix import InsertResult, MatchResult, RadixCache, RadixNode

__all__ = [
    "RESERVED_PAGE",
    "InsertResult",
    "KVLayout",
    "MatchResult",
    "PagePool",
    "RadixCache",
    "RadixNode",
    "available_memory_bytes",
    "head_rows",
    "pages_for_budget",
    "slot_indices",
]
