"""Paged attention in Triton (engine/kernels/triton/): the GPU path, the same math as `torch`.

Every layer's forward is three launches at most: the store of this step's K/V into the pages,
one extend launch for all requests adding several tokens (prefill chunks, prefix hits), and one
decode launch (plus a merge of its KV splits) for all requests adding one. Both attention
kernels read the whole context from the pages, so the store runs first. `prepare` builds the
step's tables once for every layer, with one host-to-device copy (from pinned memory on CUDA):

```
 ints (int32):  q_starts[R] | q_lens[R] | kv_lens[R] | decode_reqs[B] | block_reqs[NB] |
                block_starts[NB] | page_tables[R, max_pages] (padded with page 0)
 write_slots (int64, built on the device from the above): the pool slot of each of the T new
                tokens, in q-row order
```

A CUDA graph of decode steps cannot take fresh tables each step: `StaticDecode` keeps them in
preallocated tensors, refreshed in place, with padding rows and a fixed number of KV splits.

Scores are float32 whatever the cache dtype, scaled by the model's softmax scale; the output has
the queries' dtype, as the torch backend's. Under `TRITON_INTERPRET=1` (set before triton is
imported) the same kernels run on CPU tensors: that is how CI checks this file against
torch_backend.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

try:
    import triton
except ImportError as exc:
    raise ImportError(
        "attention_backend 'triton' needs the triton package: pip install 'triton==3.9.*' "
        "(the cpu and gpu extras have it), or use attention_backend='torch'"
    ) from exc

from engine.kernels.triton.common import PagedKV, StepTables, compiles_only, interpreted
from engine.kernels.triton.decode_attention import decode_attention
from engine.kernels.triton.extend_attention import extend_attention
from engine.kernels.triton.kv_store import store_kv
from engine.kv.pool import RESERVED_PAGE, PagePool
from engine.layers.attention.base import AttentionBackend, AttentionBatch


@dataclass(frozen=True)
class TritonBlocks:
    """Tile sizes (powers of two >= 16, what tl.dot takes on a GPU) and the decode split policy.

    A decode step splits every context `num_splits` ways, one split per `split_tokens` keys of
    its longest context, at most `max_splits`: long contexts at small batches then still fill
    the GPU's cores.
    """

    extend_m: int = 64  # new tokens per extend program
    extend_n: int = 64  # keys per extend loop step
    decode_n: int = 64  # keys per decode loop step
    split_tokens: int = 256
    max_splits: int = 16

    @classmethod
    def for_width(cls, width: int) -> TritonBlocks:
        """Defaults for keys `width` elements wide (MLA's 576 wants smaller tiles than 128)."""
        return cls() if width <= 128 else cls(extend_m=32, extend_n=32, decode_n=32)

    def num_splits(self, max_kv_len: int) -> int:
        return max(1, min(self.max_splits, triton.cdiv(max_kv_len, self.split_tokens)))


@dataclass(frozen=True)
class TritonAttentionMeta:
    """A step's tables, built once by `prepare` and read by every layer."""

    tables: StepTables
    write_slots: torch.Tensor  # [T] int64 (int32 in a StaticDecode)
    decode_reqs: torch.Tensor | None  # [B] requests adding one token
    num_splits: int  # decode KV splits
    block_reqs: torch.Tensor | None  # [NB] extend blocks: request, first new token
    block_starts: torch.Tensor | None


def host_ints(values: list[int], pin: bool) -> torch.Tensor:
    """`values` as an int32 host tensor, in pinned memory when `pin` (bound for a GPU): a
    non_blocking copy from it is then truly asynchronous, and torch's pinned-memory cache keeps
    the block from reuse until that copy has run."""
    return torch.tensor(values, dtype=torch.int32, pin_memory=pin)


class StaticDecode:
    """Decode-only step tables in preallocated device tensors, refreshed in place every step:
    what a captured CUDA graph reads (its kernels keep the addresses and grids of capture).

    Tensors are sized for `max_batch` requests of up to `max_pages` pages; a bucket of B rows
    uses the first B rows of each (views of the same memory, so every bucket sees one set).
    Request r of the step is row r (its q row, its one new token); rows past the real batch are
    padding: kv_len 1 on the reserved page 0, slot 0, which no request ever holds, so their KV
    store and attention touch nothing real. The decode launch is fixed too: `num_splits` splits
    for every context, the kernels leaving a split past a short context's end empty.

    ```
     rows:  | request 0 .. b-1 | padding (page 0, kv_len 1) .. B-1 | unused .. max_batch-1 |
    ```
    """

    def __init__(
        self,
        device: torch.device,
        max_batch: int,
        max_pages: int,
        page_size: int,
        num_splits: int,
    ) -> None:
        self.page_size, self.num_splits = page_size, num_splits
        self.pin = device.type == "cuda"
        ints = {"dtype": torch.int32, "device": device}
        self.rows = torch.arange(max_batch, **ints)  # q_starts and decode_reqs alike
        self.q_lens = torch.ones(max_batch, **ints)
        self.kv_lens = torch.ones(max_batch, **ints)
        self.slots = torch.full((max_batch,), RESERVED_PAGE * page_size, **ints)
        self.page_tables = torch.full((max_batch, max_pages), RESERVED_PAGE, **ints)
        self._metas: dict[int, TritonAttentionMeta] = {}

    @property
    def max_batch(self) -> int:
        return self.page_tables.shape[0]

    @property
    def max_pages(self) -> int:
        return self.page_tables.shape[1]

    def meta(self, bucket: int) -> TritonAttentionMeta:
        """The metadata of a `bucket`-row step: the same tensors every time it is asked for."""
        if bucket not in self._metas:
            rows = self.rows[:bucket]
            tables = StepTables(
                self.page_tables[:bucket], rows, self.q_lens[:bucket], self.kv_lens[:bucket]
            )
            self._metas[bucket] = TritonAttentionMeta(
                tables, self.slots[:bucket], rows, self.num_splits, None, None
            )
        return self._metas[bucket]

    def fits(self, batch: AttentionBatch) -> bool:
        """Whether `batch` is decode-only and within these tables' rows and pages."""
        return (
            0 < len(batch.q_lens) <= self.max_batch
            and all(q == 1 for q in batch.q_lens)
            and max(len(t) for t in batch.page_tables) <= self.max_pages
        )

    def fill(self, batch: AttentionBatch, bucket: int) -> TritonAttentionMeta:
        """Write decode-only `batch` (at most `bucket` requests) into the first `bucket` rows,
        the rest as padding, with one pinned host buffer and non_blocking copies (outside any
        capture: a graph replays after them on the same stream). Returns `meta(bucket)`."""
        if batch.num_tokens and not self.fits(batch):
            raise ValueError(
                f"a static decode step takes up to {self.max_batch} decode rows of up to "
                f"{self.max_pages} pages each (run this step eager)"
            )
        n, ps = len(batch.kv_lens), self.page_size
        if n > bucket:
            raise ValueError(f"{n} requests do not fit a bucket of {bucket} rows")
        pad = bucket - n
        width = max((len(t) for t in batch.page_tables), default=1)
        last = [kv - 1 for kv in batch.kv_lens]  # the new token's position
        ints = [*batch.kv_lens, *[1] * pad]
        ints += [t[p // ps] * ps + p % ps for t, p in zip(batch.page_tables, last)]
        ints += [RESERVED_PAGE * ps] * pad
        for table in batch.page_tables:
            ints += [*table, *[RESERVED_PAGE] * (width - len(table))]
        ints += [RESERVED_PAGE] * (width * pad)
        host = host_ints(ints, self.pin)
        self.kv_lens[:bucket].copy_(host[:bucket], non_blocking=True)
        self.slots[:bucket].copy_(host[bucket : 2 * bucket], non_blocking=True)
        # NOTE: columns past `width` keep older steps' pages; no kernel reads a page past its
        # row's kv_len, and padding rows read column 0 only.
        tables = self.page_tables[:bucket, :width]
        tables.copy_(host[2 * bucket :].view(bucket, width), non_blocking=True)
        return self.meta(bucket)


class TritonAttention(AttentionBackend):
    """Paged MHA/GQA and MLA attention in Triton kernels over `pool` (on CUDA, or on CPU under
    the interpreter); `blocks` defaults to `TritonBlocks.for_width` of the pool's rows."""

    def __init__(self, pool: PagePool, scale: float, blocks: TritonBlocks | None = None) -> None:
        self.pool = pool
        self.scale = scale
        self.page_size = pool.page_size
        self.device = pool.device
        if self.device.type != "cuda" and not interpreted() and not compiles_only():
            raise ValueError(
                f"attention_backend 'triton' runs on CUDA, and this KV pool is on {self.device} "
                "(use attention_backend='torch', or set TRITON_INTERPRET=1 before starting to "
                "run the kernels in Triton's interpreter: slow, meant for tests)"
            )
        layout = pool.layout
        width = layout.head_dim if layout.kind == "mha" else layout.latent_dim
        self.blocks = blocks or TritonBlocks.for_width(width)
        self.pin = self.device.type == "cuda"  # step tables cross from pinned host memory

    def static_decode(self, max_batch: int, max_pages: int) -> StaticDecode:
        """Decode tables in preallocated tensors for up to `max_batch` requests of up to
        `max_pages` pages each: what a CUDA graph of decode steps reads (engine/cuda_graph.py).
        Contexts split as many ways as the longest that fits would be, whatever their length."""
        splits = self.blocks.num_splits(max_pages * self.page_size)
        return StaticDecode(self.device, max_batch, max_pages, self.page_size, splits)

    def prepare(self, batch: AttentionBatch) -> TritonAttentionMeta:
        q_lens, kv_lens = list(batch.q_lens), list(batch.kv_lens)
        n, step = len(q_lens), self.blocks.extend_m
        decode = [r for r in range(n) if q_lens[r] == 1]
        blocks = [(r, m0) for r in range(n) if q_lens[r] > 1 for m0 in range(0, q_lens[r], step)]
        max_pages = max(len(t) for t in batch.page_tables)
        ints = [0, *accumulate(q_lens[:-1]), *q_lens, *kv_lens, *decode]
        ints += [r for r, _ in blocks] + [m0 for _, m0 in blocks]
        for table in batch.page_tables:
            ints += [*table, *[RESERVED_PAGE] * (max_pages - len(table))]
        data = host_ints(ints, self.pin).to(self.device, non_blocking=True)
        q_starts, q_lens_t, kv_lens_t, decode_t, block_reqs, block_starts, pages = data.split(
            [n, n, n, len(decode), len(blocks), len(blocks), n * max_pages]
        )
        step_tables = StepTables(pages.view(n, max_pages), q_starts, q_lens_t, kv_lens_t)
        max_decode_len = max((kv_lens[r] for r in decode), default=0)
        return TritonAttentionMeta(
            step_tables,
            self._write_slots(step_tables, sum(q_lens)),
            decode_t if decode else None,
            self.blocks.num_splits(max_decode_len),
            block_reqs if blocks else None,
            block_starts if blocks else None,
        )

    def _write_slots(self, tables: StepTables, tokens: int) -> torch.Tensor:
        """Pool slot of every new token, in q-row order."""
        n = len(tables.q_lens)
        reqs = torch.arange(n, device=self.device)
        req_of = torch.repeat_interleave(reqs, tables.q_lens, output_size=tokens)
        first = (tables.kv_lens - tables.q_lens - tables.q_starts)[req_of]
        pos = torch.arange(tokens, device=self.device) + first
        ps = self.page_size
        return tables.page_tables[req_of, pos // ps].long() * ps + pos % ps

    def forward(self, q, k, v, layer, meta: TritonAttentionMeta) -> torch.Tensor:
        k_cache = PagedKV.mha(self.pool.k_buffer(layer))
        v_cache = PagedKV.mha(self.pool.v_buffer(layer))
        store_kv(k, v, k_cache, v_cache, meta.write_slots)
        out = q.new_empty(q.shape)
        self._attend(q, None, k_cache, v_cache, out, meta)
        return out

    def forward_mla(self, q_latent, q_rope, latent, k_rope, layer, meta) -> torch.Tensor:
        cache = PagedKV.mla(self.pool.latent_buffer(layer))
        rank = latent.shape[-1]
        store_kv(latent[:, None], k_rope[:, None], cache, cache, meta.write_slots, b_column=rank)
        out = q_latent.new_empty(q_latent.shape)
        q_pe = q_rope if q_rope.shape[-1] else None
        self._attend(q_latent, q_pe, cache, None, out, meta)
        return out

    def _attend(self, q, q_pe, k_cache, v_cache, out, meta: TritonAttentionMeta) -> None:
        if meta.block_reqs is not None:
            assert meta.block_starts is not None
            extend_attention(
                q,
                q_pe,
                k_cache,
                v_cache,
                out,
                meta.tables,
                meta.block_reqs,
                meta.block_starts,
                scale=self.scale,
                block_m=self.blocks.extend_m,
                block_n=self.blocks.extend_n,
            )
        if meta.decode_reqs is not None:
            decode_attention(
                q,
                q_pe,
                k_cache,
                v_cache,
                out,
                meta.tables,
                meta.decode_reqs,
                scale=self.scale,
                num_splits=meta.num_splits,
                block_n=self.blocks.decode_n,
            )
