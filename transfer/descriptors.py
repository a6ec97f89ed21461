"""Turning (source pages, destination pages) into engine descriptors, merged and batched.

A descriptor is (source address, destination address, length). For every buffer (a layer's K,
V or latent) each page is one descriptor, except that runs of pages contiguous on *both* sides
merge into one::

    src pages  7  8  9  3      dst pages  40 41 42 90
               '-----'  |                 '------'  |
               one run of 3 pages      one page

Runs are found once and applied to every buffer whose pages sit back to back (stride equal to
page bytes); a strided buffer (a per-layer view into a page-major pool) gets one descriptor per
page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .buffers import KVBuffer


@dataclass(frozen=True)
class DescriptorBatch:
    """Parallel uint64 arrays: one descriptor per index."""

    src: np.ndarray
    dst: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())

    @classmethod
    def single(cls, src: int, dst: int, length: int) -> DescriptorBatch:
        return cls(*(np.array([v], dtype=np.uint64) for v in (src, dst, length)))


@dataclass(frozen=True)
class PageRuns:
    """Runs of pages contiguous on both sides: start pages and run lengths."""

    src_start: np.ndarray
    dst_start: np.ndarray
    length: np.ndarray


def page_runs(src_pages: np.ndarray, dst_pages: np.ndarray) -> PageRuns:
    """Split paired page lists into maximal runs that are consecutive on both sides."""
    if len(src_pages) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return PageRuns(empty, empty, empty)
    joins = (np.diff(src_pages) == 1) & (np.diff(dst_pages) == 1)
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    lengths = np.diff(np.append(starts, len(src_pages)))
    return PageRuns(src_pages[starts], dst_pages[starts], lengths)


def check_pages(pages: np.ndarray, num_pages: int, side: str) -> None:
    """Raise a clear error for page ids outside a pool of ``num_pages``."""
    if len(pages) and (pages.min() < 0 or pages.max() >= num_pages):
        bad = int(pages.max() if pages.max() >= num_pages else pages.min())
        raise ValueError(f"{side} page {bad} out of range (the {side} pool has {num_pages} pages)")


def build_descriptors(
    src_buffers: Sequence[KVBuffer],
    dst_buffers: Sequence[KVBuffer],
    src_pages: Sequence[int],
    dst_pages: Sequence[int],
) -> DescriptorBatch:
    """All descriptors that copy ``src_pages`` of every source buffer into ``dst_pages``."""
    src = np.asarray(src_pages, dtype=np.int64)
    dst = np.asarray(dst_pages, dtype=np.int64)
    if len(src) != len(dst):
        raise ValueError(f"page count differs: source {len(src)}, destination {len(dst)}")
    runs = page_runs(src, dst)
    ones = np.ones(len(src), dtype=np.int64)
    parts = []
    for s_buf, d_buf in zip(src_buffers, dst_buffers, strict=True):
        check_pages(src, s_buf.num_pages, "source")
        check_pages(dst, d_buf.num_pages, "destination")
        packed = s_buf.stride == s_buf.page_bytes and d_buf.stride == d_buf.page_bytes
        s_start, d_start, count = (
            (runs.src_start, runs.dst_start, runs.length)
            if packed
            else (
                src,
                dst,
                ones,
            )
        )
        parts.append(
            (
                s_buf.base_ptr + s_start * s_buf.stride,
                d_buf.base_ptr + d_start * d_buf.stride,
                count * s_buf.page_bytes,
            )
        )
    if not parts:
        return DescriptorBatch(*(np.zeros(0, dtype=np.uint64) for _ in range(3)))
    cols = (np.concatenate([p[i] for p in parts]).astype(np.uint64) for i in range(3))
    return DescriptorBatch(*cols)


def split_batches(batch: DescriptorBatch, max_descriptors: int) -> list[DescriptorBatch]:
    """Cut a batch into pieces of at most ``max_descriptors`` (engines reject huge batches)."""
    if max_descriptors <= 0:
        raise ValueError(f"max_descriptors must be positive, got {max_descriptors}")
    return [
        DescriptorBatch(
            batch.src[i : i + max_descriptors],
            batch.dst[i : i + max_descriptors],
            batch.lengths[i : i + max_descriptors],
        )
        for i in range(0, len(batch), max_descriptors)
    ]
