"""Model runner: owns the model, the KV pool and the attention backend; runs one step.

A step's requests are flattened into one token batch (see attention/base.py for the layout);
only the rows of requests that reach the end of their sequence go through the LM head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import ModelConfig, parse_dtype
from engine.kernels.build import keep_freed_memory_mapped
from engine.kernels.decode_attention import build_decode_attention
from engine.kernels.decode_layer import build_fused_decode
from engine.kernels.lm_head import build_lm_head
from engine.kv.pool import KVLayout, PagePool, available_memory_bytes, pages_for_budget
from engine.layers.attention import create_backend
from engine.layers.attention.base import AttentionBackend, AttentionBatch
from engine.models import model_class
from engine.options import EngineOptions
from engine.sampling import SampleOutput, Sampler, plain_greedy
from engine.scheduler import ScheduledBatch
from engine.weights import iter_weights

log = logging.getLogger(__name__)


@dataclass
class ForwardContext:
    """What the model's attention layers need for this step."""

    backend: AttentionBackend
    meta: Any

    def attention(self, q, k, v, layer: int) -> torch.Tensor:
        return self.backend.forward(q, k, v, layer, self.meta)

    def attention_mla(self, q_latent, q_rope, latent, k_rope, layer: int) -> torch.Tensor:
        return self.backend.forward_mla(q_latent, q_rope, latent, k_rope, layer, self.meta)


@dataclass(frozen=True)
class StepResult:
    """Requests that sampled this step, their tokens, and the logits they were drawn from."""

    sampled: list[Any]
    output: SampleOutput | None
    logits: torch.Tensor | None


def load_model(model_cfg: ModelConfig, path: str, dtype: torch.dtype, device: str) -> Any:
    """Build the model for `model_cfg` and load the checkpoint at `path` into it."""
    with torch.device(device):
        model = model_class(model_cfg)(model_cfg)
    model.load_weights(iter_weights(path, model_cfg.fp8))
    return model.to(dtype=dtype).eval()


def kv_layout(model_cfg: ModelConfig, dtype: torch.dtype) -> KVLayout:
    if model_cfg.mla is not None:
        mla = model_cfg.mla
        return KVLayout.mla(model_cfg.num_layers, mla.kv_lora_rank, mla.qk_rope_head_dim, dtype)
    return KVLayout.mha(model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim, dtype)


class ModelRunner:
    def __init__(
        self,
        model_path: str,
        options: EngineOptions,
        model_cfg: ModelConfig,
        eos_token_ids: frozenset[int],
        *,
        keep_logits: bool = False,
    ) -> None:
        self.options = options
        self.keep_logits = keep_logits  # callers read StepResult.logits: never skip them
        self.model_cfg = model_cfg
        self.device = torch.device(options.device)
        self.dtype = parse_dtype(options.dtype) if options.dtype else model_cfg.dtype
        self.model = load_model(model_cfg, model_path, self.dtype, options.device)
        layout = kv_layout(model_cfg, self.dtype)
        self.pool = PagePool(layout, self._num_pages(layout), options.page_size, options.device)
        self.attention = create_backend(
            options.attention_backend, self.pool, model_cfg.softmax_scale
        )
        self.lm_head_kernel = None
        self.fused_decode = None
        if options.cpu_kernels and self.device.type == "cpu":
            self._use_cpu_kernels()
        self.sampler = Sampler(eos_token_ids, seed=options.seed)
        log.info(
            "model loaded: %s, %d KV pages of %d tokens",
            model_cfg.family,
            self.pool.total_pages,
            options.page_size,
        )

    def _use_cpu_kernels(self) -> None:
        """The native CPU paths (engine/kernels/), each off by itself where it cannot run."""
        keep_freed_memory_mapped()
        threads = torch.get_num_threads()
        self.lm_head_kernel = build_lm_head(self.model.lm_head_weight, threads)
        if hasattr(self.attention, "decode_kernel"):  # the torch backend
            self.attention.decode_kernel = build_decode_attention(threads)
            scale = self.model_cfg.softmax_scale
            self.fused_decode = build_fused_decode(self.model, self.pool, scale, threads)

    def _num_pages(self, layout: KVLayout) -> int:
        cache = self.options.cache
        if cache.max_total_tokens is not None:
            return pages_for_budget(layout, cache.page_size, max_tokens=cache.max_total_tokens)
        mem = int(available_memory_bytes(self.device) * cache.mem_fraction)
        return pages_for_budget(layout, cache.page_size, mem_bytes=mem)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        """Compute the batch's tokens; sample for requests that reach their sequence end."""
        ids, positions, logit_rows, sampled = [], [], [], []
        row = 0
        for req, n, samples in zip(batch.reqs, batch.num_tokens, batch.samples):
            start = req.num_computed
            ids.extend(req.token_slice(start, start + n))
            positions.extend(range(start, start + n))
            row += n
            if samples:
                logit_rows.append(row - 1)
                sampled.append(req)
        meta = self.attention.prepare(
            AttentionBatch(
                q_lens=batch.num_tokens,
                kv_lens=[r.num_computed + n for r, n in zip(batch.reqs, batch.num_tokens)],
                page_tables=[r.page_table for r in batch.reqs],
                page_size=self.pool.page_size,
            )
        )
        ctx = ForwardContext(self.attention, meta)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.fused_decode is not None and not meta.extends and meta.decode_rows is not None:
            hidden = self.fused_decode(input_ids, pos, meta)  # every row decodes: one call
        else:
            hidden = self.model(input_ids, pos, ctx)
        if not sampled:
            return StepResult([], None, None)
        params, states = [r.params for r in sampled], [r.sampler_state for r in sampled]
        if (
            self.lm_head_kernel is not None
            and not self.keep_logits
            and plain_greedy(params, states)
        ):
            # greedy with nothing else asked: the kernel's argmax, no logits written out
            tokens = self.lm_head_kernel.argmax(hidden[logit_rows])
            return StepResult(sampled, SampleOutput(tokens.tolist()), None)
        rows = hidden[logit_rows]
        if self.lm_head_kernel is not None:
            logits = self.lm_head_kernel(rows)  # the same logits, float32, faster
        else:
            logits = self.model.compute_logits(rows)
        return StepResult(sampled, self.sampler(logits, params, states), logits)
