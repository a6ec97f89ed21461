"""Paged KV pool: per-layer KV buffers indexed by page, and the allocator that hands pages out.

Every buffer (one per layer for MLA; one K and one V per layer for MHA/GQA) has the same rows:

```
 row:     0          1          2                     total_pages
        +----------+----------+----------+   ...   +----------+
        | padding  |  page 1  |  page 2  |         |  page N  |
        +----------+----------+----------+   ...   +----------+
          reserved   each row holds page_size token slots:
                     MHA  [kv_heads, page_size, head_dim]   head-major ("HND")
                     MLA  [page_size, kv_lora_rank + rope_dim]

 slot of token position p in a request whose page table is T:
        slot(p) = T[p // page_size] * page_size + p % page_size
 MLA: the row-major index into buffer.view(-1, latent_dim).
 MHA: head h of slot s is buffer[s // page_size, h, s % page_size], which is row
        (s // page_size * kv_heads + h) * page_size + s % page_size   of buffer.view(-1, head_dim)
      (`head_rows`).

 MHA page p of a buffer, heads [a, b): one contiguous byte range
        start  = base + p * page_bytes + a * head_page_bytes
        length = (b - a) * head_page_bytes,   head_page_bytes = page_size * head_dim * itemsize
```

NOTE: MHA pages are head-major so that a rank holding heads [a, b) of a model can write its share
of a page into a peer whose pages hold more or fewer heads (prefill and decode at different TP)
with one transfer descriptor per page and buffer, not one per token.

NOTE: row 0 is a padding page. It is never handed out, so a batch can point padded token slots
(CUDA-graph padding, dummy requests) at page 0 and write there without touching live KV. A pool of
`total_pages` usable pages therefore allocates `total_pages + 1` rows.

The transfer layer sees only `buffer_descs()`: a base pointer, a byte length, and the bytes of
one page for each buffer, so one code path moves both layouts.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

RESERVED_PAGE = 0
"""Row 0 of every buffer: padding slots, never allocated."""

_MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class KVLayout:
    """Shape of the KV cache of one model on one rank (all layers).

    Build it with `KVLayout.mha(...)` or `KVLayout.mla(...)`.
    """

    kind: Literal["mha", "mla"]
    num_layers: int
    dtype: torch.dtype
    num_kv_heads: int = 0  # mha only
    head_dim: int = 0  # mha only
    kv_lora_rank: int = 0  # mla only
    rope_dim: int = 0  # mla only

    @staticmethod
    def mha(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32
    ) -> KVLayout:
        """MHA/GQA: a K and a V buffer per layer, each [pages, kv_heads, page_size, head_dim]."""
        return KVLayout("mha", num_layers, dtype, num_kv_heads=num_kv_heads, head_dim=head_dim)

    @staticmethod
    def mla(
        num_layers: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype = torch.float32
    ) -> KVLayout:
        """MLA: one latent buffer per layer, [pages, page_size, kv_lora_rank + rope_dim]."""
        return KVLayout("mla", num_layers, dtype, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"KVLayout needs num_layers >= 1, got {self.num_layers}")
        if self.kind == "mha":
            if self.num_kv_heads < 1 or self.head_dim < 1:
                raise ValueError(
                    f"MHA layout needs num_kv_heads >= 1 and head_dim >= 1, got "
                    f"{self.num_kv_heads} and {self.head_dim} (build it with KVLayout.mha)"
                )
        elif self.kind == "mla":
            if self.kv_lora_rank < 1 or self.rope_dim < 0:
                raise ValueError(
                    f"MLA layout needs kv_lora_rank >= 1 and rope_dim >= 0, got "
                    f"{self.kv_lora_rank} and {self.rope_dim} (build it with KVLayout.mla)"
                )
        else:
            raise ValueError(f"unknown KV layout kind {self.kind!r} (use 'mha' or 'mla')")

    @property
    def latent_dim(self) -> int:
        """MLA: width of one cached token (compressed KV + decoupled rope key)."""
        return self.kv_lora_rank + self.rope_dim

    def page_shape(self, page_size: int) -> tuple[int, ...]:
        """Shape of one page of one buffer: MHA [kv_heads, page_size, head_dim] (head-major),
        MLA [page_size, latent_dim]."""
        if self.kind == "mha":
            return (self.num_kv_heads, page_size, self.head_dim)
        return (page_size, self.latent_dim)

    @property
    def token_elems(self) -> int:
        """Elements one token occupies in one buffer."""
        return self.num_kv_heads * self.head_dim if self.kind == "mha" else self.latent_dim

    def head_page_bytes(self, page_size: int) -> int:
        """MHA: bytes of one KV head's slice of a page of one buffer; heads [a, b) of page p
        are the bytes [p * page_bytes + a * this, p * page_bytes + b * this) of the buffer."""
        if self.kind != "mha":
            raise ValueError(f"a {self.kind} KV layout has no KV heads (head slices are MHA only)")
        return page_size * self.head_dim * self.dtype.itemsize

    @property
    def buffers_per_layer(self) -> int:
        return 2 if self.kind == "mha" else 1

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (K and V, or the latent)."""
        return self.num_layers * self.buffers_per_layer * self.token_elems * self.dtype.itemsize

    def bytes_per_page(self, page_size: int) -> int:
        """Bytes one page occupies across all layers and buffers."""
        return self.bytes_per_token * page_size


def pages_for_budget(
    layout: KVLayout,
    page_size: int,
    *,
    max_tokens: int | None = None,
    mem_bytes: int | None = None,
) -> int:
    """Usable pages (`PagePool.total_pages`) for a token budget or a byte budget.

    A token budget rounds up to whole pages. A byte budget rounds down and pays for the reserved
    padding page, so the pool it sizes never allocates more than `mem_bytes`.
    """
    if (max_tokens is None) == (mem_bytes is None):
        raise ValueError("pages_for_budget needs exactly one of max_tokens= or mem_bytes=")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens} (set cache.max_tokens)")
        return -(-max_tokens // page_size)
    assert mem_bytes is not None
    page_bytes = layout.bytes_per_page(page_size)
    usable = mem_bytes // page_bytes - 1
    if usable < 1:
        raise ValueError(
            f"{mem_bytes} bytes of KV memory hold no usable page ({page_bytes} bytes per page "
            "plus one padding page): raise cache.mem_fraction, set cache.max_tokens, or lower "
            "cache.page_size"
        )
    return usable


def available_memory_bytes(device: str | torch.device) -> int:
    """Free memory the KV pool may take a fraction of: free CUDA memory (once torch's cache of
    freed blocks is handed back, or loading's leftovers would count as taken), or MemAvailable
    on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type == "cpu":
        if not _MEMINFO.is_file():
            raise RuntimeError(
                f"cannot read {_MEMINFO} to size the KV pool; set cache.max_tokens instead"
            )
        return parse_mem_available(_MEMINFO.read_text())
    raise ValueError(
        f"cannot measure free memory on device {dev}; set cache.max_tokens to size the KV pool"
    )


def parse_mem_available(meminfo: str) -> int:
    """Bytes of the `MemAvailable:` line of /proc/meminfo text."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            scale = 1024 if len(fields) > 2 and fields[2].lower() == "kb" else 1
            return int(fields[1]) * scale
    raise RuntimeError("no MemAvailable line in /proc/meminfo; set cache.max_tokens instead")


def slot_indices(
    page_table: Sequence[int] | torch.Tensor, start: int, end: int, *, page_size: int
) -> torch.Tensor:
    """Flat token slots (int64) of token positions [start, end) of one request.

    `page_table[i]` holds positions [i * page_size, (i + 1) * page_size). The result lives on the
    page table's device (CPU for a list).
    """
    table = torch.as_tensor(page_table, dtype=torch.int64)
    capacity = table.numel() * page_size
    if not 0 <= start <= end <= capacity:
        raise ValueError(
            f"token range [{start}, {end}) is outside the {table.numel()} pages of the page "
            f"table ({capacity} slots); allocate pages for the request before computing slots"
        )
    positions = torch.arange(start, end, dtype=torch.int64, device=table.device)
    return table[positions // page_size] * page_size + positions % page_size


def head_rows(slots: torch.Tensor, kv_heads: int, page_size: int) -> torch.Tensor:
    """MHA: the rows of `buffer.view(-1, head_dim)` holding every head of token `slots`.

    Returns [..., kv_heads, n] for slots [..., n] (head-major, as the pages are): row
    (page * kv_heads + h) * page_size + offset of slot page * page_size + offset.
    """
    page, offset = slots // page_size, slots % page_size
    base = (page * (kv_heads * page_size) + offset).unsqueeze(-2)
    heads = torch.arange(kv_heads, dtype=slots.dtype, device=slots.device)
    return base + (heads * page_size).unsqueeze(-1)


def _as_page_list(pages: Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(pages, torch.Tensor):
        return [int(p) for p in pages.flatten().tolist()]
    return [int(p) for p in pages]


class PagePool:
    """Fixed set of KV pages with per-layer buffers and a page allocator.

    The pool does not know who holds a page; callers (requests, the radix cache) do, and
    `check_integrity(held)` checks their view against the free list. `alloc` hands out the lowest
    free page ids first (ascending), which keeps a request's pages in contiguous runs for
    the transfer engine more often. alloc/free cost O(n log total) for n pages.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_pages: int,
        page_size: int,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"a page pool needs num_pages >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.layout = layout
        self.page_size = page_size
        self.device = torch.device(device)
        self._num_pages = num_pages
        self._buffers = [
            self._new_buffer() for _ in range(layout.num_layers * layout.buffers_per_layer)
        ]
        self._free_heap: list[int] = list(range(1, num_pages + 1))  # sorted, so already a heap
        self._is_free = bytearray([0]) + bytearray([1]) * num_pages

    def _new_buffer(self) -> torch.Tensor:
        shape = (self._num_pages + 1, *self.layout.page_shape(self.page_size))
        return torch.zeros(shape, dtype=self.layout.dtype, device=self.device)

    # ---- allocator -------------------------------------------------------------------------

    @property
    def total_pages(self) -> int:
        """Usable pages (the padding page excluded)."""
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free_heap)

    def is_free(self, page: int) -> bool:
        self._check_page(page)
        return bool(self._is_free[page])

    def alloc(self, n: int) -> list[int] | None:
        """`n` pages (ascending ids), or None when fewer than `n` are free. Never partial."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free_heap):
            return None
        pages = [heapq.heappop(self._free_heap) for _ in range(n)]
        for page in pages:
            self._is_free[page] = 0
        return pages

    def free(self, pages: Iterable[int] | torch.Tensor) -> None:
        """Return pages to the pool. All-or-nothing: a bad page leaves the pool unchanged."""
        pages = _as_page_list(pages)
        seen: set[int] = set()
        for page in pages:
            self._check_page(page)
            if self._is_free[page] or page in seen:
                raise ValueError(
                    f"double free of KV page {page}: it is already free (free each page once, "
                    "by its one owner)"
                )
            seen.add(page)
        for page in pages:
            self._is_free[page] = 1
            heapq.heappush(self._free_heap, page)

    def _check_page(self, page: int) -> None:
        if page == RESERVED_PAGE:
            raise ValueError(f"KV page {RESERVED_PAGE} is the reserved padding page; never free it")
        if not 0 < page <= self._num_pages:
            raise ValueError(
                f"KV page {page} is out of range: pages are 1..{self._num_pages} "
                "(was it allocated from another pool?)"
            )

    # ---- buffers ---------------------------------------------------------------------------

    def k_buffer(self, layer: int) -> torch.Tensor:
        """MHA: K of `layer`, [total_pages + 1, kv_heads, page_size, head_dim]."""
        self._require("mha", "k_buffer")
        return self._buffers[2 * self._layer(layer)]

    def v_buffer(self, layer: int) -> torch.Tensor:
        """MHA: V of `layer`, [total_pages + 1, kv_heads, page_size, head_dim]."""
        self._require("mha", "v_buffer")
        return self._buffers[2 * self._layer(layer) + 1]

    def latent_buffer(self, layer: int) -> torch.Tensor:
        """MLA: latent KV of `layer`, [total_pages + 1, page_size, kv_lora_rank + rope_dim]."""
        self._require("mla", "latent_buffer")
        return self._buffers[self._layer(layer)]

    def buffers(self) -> list[torch.Tensor]:
        """Every buffer in a fixed order: MHA [K0, V0, K1, V1, ...]; MLA [L0, L1, ...]."""
        return list(self._buffers)

    def buffer_descs(self) -> list[tuple[int, int, int]]:
        """(base data_ptr, nbytes, bytes of one page) per buffer, in `buffers()` order.

        Page `p` of a buffer starts at `ptr + p * page_nbytes`; MHA heads [a, b) of it are
        `(b - a) * layout.head_page_bytes(page_size)` bytes from `a * head_page_bytes` on.
        """
        return [(buf.data_ptr(), buf.nbytes, buf[0].nbytes) for buf in self._buffers]

    def slot_indices(
        self, page_table: Sequence[int] | torch.Tensor, start: int, end: int
    ) -> torch.Tensor:
        """Flat token slots for positions [start, end); see the module `slot_indices`."""
        return slot_indices(page_table, start, end, page_size=self.page_size)

    def _require(self, kind: str, what: str) -> None:
        if self.layout.kind != kind:
            other = "latent_buffer" if kind == "mha" else "k_buffer/v_buffer"
            raise TypeError(
                f"{what} needs an {kind} layout; this pool is {self.layout.kind} (use {other})"
            )

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.layout.num_layers:
            raise IndexError(f"layer {layer} out of range: the pool has {self.layout.num_layers}")
        return layer

    # ---- invariants ------------------------------------------------------------------------

    def check_integrity(self, held: Iterable[Iterable[int]] = ()) -> None:
        """Every usable page is either free or held by exactly one owner in `held`.

        `held` lists each owner's pages (the radix cache's `all_pages()`, each request's own
        pages). Raises AssertionError naming the first offending page.
        """
        self._check_free_list()
        held_by: dict[int, int] = {}
        for owner, pages in enumerate(held):
            for page in _as_page_list(pages):
                self._check_held_page(page, owner, held_by)
                held_by[page] = owner
        leaked = [
            p for p in range(1, self._num_pages + 1) if not self._is_free[p] and p not in held_by
        ]
        if leaked:
            raise AssertionError(
                f"KV page {leaked[0]} leaked: neither free nor held ({len(leaked)} leaked pages: "
                f"{leaked[:8]}{'...' if len(leaked) > 8 else ''})"
            )

    def _check_held_page(self, page: int, owner: int, held_by: dict[int, int]) -> None:
        if not 0 < page <= self._num_pages:
            raise AssertionError(f"KV page {page} held by owner {owner} is not a usable page")
        if page in held_by:
            raise AssertionError(
                f"KV page {page} held twice: by owner {held_by[page]} and owner {owner}"
            )
        if self._is_free[page]:
            raise AssertionError(f"KV page {page} is both free and held by owner {owner}")

    def _check_free_list(self) -> None:
        if self._is_free[RESERVED_PAGE]:
            raise AssertionError(f"reserved KV page {RESERVED_PAGE} is marked free")
        if len(set(self._free_heap)) != len(self._free_heap):
            raise AssertionError("a KV page is on the free list twice")
        unmarked = [p for p in self._free_heap if not self._is_free[p]]
        if unmarked or sum(self._is_free) != len(self._free_heap):
            raise AssertionError(f"free list and free flags disagree (e.g. pages {unmarked[:8]})")
