"""Paged attention with FlashInfer (CUDA only): its paged prefill and decode wrappers for
MHA/GQA and its MLA wrapper for DeepSeek, planned once per step and run by every layer.

The pool's pages are already what FlashInfer reads: MHA buffers are `[pages, kv_heads,
page_size, head_dim]` per layer for K and for V (its "HND" layout, passed as a (K, V) tuple),
and an MLA buffer `[pages, page_size, kv_lora_rank + rope_dim]` is read as two strided views,
the compressed latent and the rope key. Page ids are the pool's own, so the reserved padding
page 0 needs nothing special. This step's K/V (or latent) are stored first with one
`index_copy_` over the same rows the torch backend writes.

A step whose every request decodes one token runs the decode wrapper (MHA); anything else (a
prefill chunk among them) runs the prefill wrapper over the whole step, causal from each
request's cached length. MLA always runs the MLA wrapper, causal likewise.

FlashInfer is imported only when this backend is picked; without it, or without a GPU, the
engine fails at load saying which backend to use instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

import torch

from engine.kv.pool import PagePool, head_rows
from engine.layers.attention.base import AttentionBackend, AttentionBatch

WORKSPACE_BYTES = 256 * 1024 * 1024  # FlashInfer's split-KV scratch (it suggests 128 MiB+)


def import_flashinfer() -> Any:
    try:
        return import_module("flashinfer")
    except ImportError as exc:
        raise ValueError(
            "attention_backend 'flashinfer' needs FlashInfer, which is not installed "
            f"({exc}): pip install flashinfer-python on a CUDA machine (make setup does it "
            "there), or use attention_backend 'triton' or 'torch'"
        ) from None


@dataclass
class FlashInferMeta:
    write_slots: torch.Tensor  # [T] flat cache slots of this step's tokens
    decode_only: bool  # every request decodes one token: the decode wrapper runs
    page_size: int
    _write_rows: torch.Tensor | None = None

    def write_rows(self, kv_heads: int) -> torch.Tensor:
        """MHA: [T * kv_heads] rows of `buffer.view(-1, head_dim)`, token then head."""
        if self._write_rows is None:
            rows = head_rows(self.write_slots, kv_heads, self.page_size)
            self._write_rows = rows.t().flatten()
        return self._write_rows


def check_dtype(dtype: torch.dtype) -> None:
    """FlashInfer's kernels take fp16 and bf16 (a float32 model would fail at its first step)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention_backend 'flashinfer' takes a bfloat16 or float16 model, and this one is "
            f"{str(dtype).removeprefix('torch.')}: set engine.dtype: bfloat16, or use "
            "attention_backend 'triton' or 'torch'"
        )


class FlashInferAttention(AttentionBackend):
    def __init__(self, pool: PagePool, scale: float) -> None:
        if pool.device.type != "cuda":
            raise ValueError(
                f"attention_backend 'flashinfer' runs on CUDA only (engine.device is "
                f"{pool.device}): use attention_backend 'torch' (or 'triton') there"
            )
        check_dtype(pool.layout.dtype)
        fi = import_flashinfer()
        self.pool, self.scale, self.layout = pool, scale, pool.layout
        # NOTE: zeroed, as FlashInfer asks of a workspace's first use
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        if self.layout.kind == "mla":
            self.mla = fi.mla.BatchMLAPagedAttentionWrapper(workspace, backend="auto")
        else:
            self.prefill = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "HND")
            self.decode = fi.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "HND", use_tensor_cores=True
            )
        self._pending: tuple[Any, ...] | None = None
        self._planned: torch.cuda.Event | None = None  # the last plan's copies, queued

    def prepare(self, batch: AttentionBatch) -> FlashInferMeta:
        """The step's index arrays; the wrapper is planned at the first layer (which tells the
        query heads and dtype) and reused by the rest."""
        page_size, device = batch.page_size, self.pool.device
        pages_per_req = [-(-kv // page_size) for kv in batch.kv_lens]
        indices = [p for table, n in zip(batch.page_tables, pages_per_req) for p in table[:n]]
        as_int = {"dtype": torch.int32}
        qo_indptr = torch.tensor([0, *batch.q_lens], **as_int).cumsum(0, dtype=torch.int32)
        kv_indptr = torch.tensor([0, *pages_per_req], **as_int).cumsum(0, dtype=torch.int32)
        kv_lens = torch.tensor(list(batch.kv_lens), **as_int)
        last_page = kv_lens - (kv_indptr[1:] - kv_indptr[:-1] - 1) * page_size
        slots = []
        for q, kv, table in zip(batch.q_lens, batch.kv_lens, batch.page_tables):
            pos = torch.arange(kv - q, kv)
            slots.append(torch.tensor(list(table), dtype=torch.long)[pos // page_size] * page_size
                         + pos % page_size)  # fmt: skip
        write_slots = torch.cat(slots).to(device, non_blocking=True)
        decode_only = all(q == 1 for q in batch.q_lens)
        self._pending = (
            qo_indptr, kv_indptr, torch.tensor(indices, **as_int), last_page, kv_lens, decode_only
        )  # fmt: skip
        return FlashInferMeta(write_slots, decode_only, page_size)

    def _plan(self, heads: int, q_dtype: torch.dtype) -> None:
        """Plan this step's wrapper once (the first layer's call)."""
        if self._pending is None:
            return
        qo_indptr, kv_indptr, indices, last_page, kv_lens, decode_only = self._pending
        self._pending = None
        # NOTE: a plan writes its schedule into pinned host memory and queues a copy to the
        # GPU without waiting; the next plan must not overwrite (or let torch reuse) that memory
        # before the copy has run, which a run of steps with no host sync (prefill chunks) allows
        if self._planned is not None:
            self._planned.synchronize()
        layout, page_size, kv_dtype = self.layout, self.pool.page_size, self.layout.dtype
        if layout.kind == "mla":
            self.mla.plan(
                qo_indptr, kv_indptr, indices, kv_lens, heads, layout.kv_lora_rank,
                layout.rope_dim, page_size, True, self.scale, q_dtype, kv_dtype,
            )  # fmt: skip
        elif decode_only:
            self.decode.plan(
                kv_indptr, indices, last_page, heads, layout.num_kv_heads, layout.head_dim,
                page_size, sm_scale=self.scale, q_data_type=q_dtype, kv_data_type=kv_dtype,
            )  # fmt: skip
        else:
            self.prefill.plan(
                qo_indptr, kv_indptr, indices, last_page, heads, layout.num_kv_heads,
                layout.head_dim, page_size, causal=True, sm_scale=self.scale,
                q_data_type=q_dtype, kv_data_type=kv_dtype,
            )  # fmt: skip
        self._planned = torch.cuda.Event()
        self._planned.record()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, meta: Any
    ) -> torch.Tensor:
        self._plan(q.shape[1], q.dtype)
        k_buf, v_buf = self.pool.k_buffer(layer), self.pool.v_buffer(layer)
        rows, dim = meta.write_rows(k.shape[1]), k.shape[-1]
        k_buf.view(-1, dim).index_copy_(0, rows, k.reshape(-1, dim).to(k_buf.dtype))
        v_buf.view(-1, dim).index_copy_(0, rows, v.reshape(-1, dim).to(v_buf.dtype))
        wrapper = self.decode if meta.decode_only else self.prefill
        return wrapper.run(q.contiguous(), (k_buf, v_buf))

    def forward_mla(
        self,
        q_latent: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        layer: int,
        meta: Any,
    ) -> torch.Tensor:
        self._plan(q_latent.shape[1], q_latent.dtype)
        buffer = self.pool.latent_buffer(layer)
        rank = latent.shape[-1]
        step_kv = torch.cat((latent, k_rope), dim=-1).to(buffer.dtype)
        buffer.view(-1, buffer.shape[-1]).index_copy_(0, meta.write_slots, step_kv)
        ckv, kpe = buffer[..., :rank], buffer[..., rank:]
        return self.mla.run(q_latent.contiguous(), q_rope.contiguous(), ckv, kpe)
