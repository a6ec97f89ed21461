"""Model runner: owns the model, the KV pool and the attention backend; runs one step.

A step's requests are flattened into one token batch (see attention/base.py for the layout);
only the rows of requests that reach the end of their sequence go through the LM head.

With a rank group (tensor parallelism) every rank has a runner over its slice of the model and
its own KV heads. Rank 0's `run` turns the scheduled batch into a `StepPlan`, broadcasts it,
and every rank `execute`s the same plan (the layers' collectives meet there); only rank 0
samples.

On CUDA with the triton backend, a decode-only step replays a CUDA graph captured at start for
its batch-size bucket (engine/cuda_graph.py; engine option `cuda_graphs`): on one rank, and on
every rank of a group, TP, EP or DP attention alike (engine/graph_steps.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.config import ModelConfig, parse_dtype
from engine.cuda_graph import DecodeGraphs
from engine.grammar import token_bitmask
from engine.graph_steps import GraphSteps
from engine.kernels.build import keep_freed_memory_mapped
from engine.kernels.decode_attention import build_decode_attention
from engine.kernels.decode_layer import build_fused_decode
from engine.kernels.lm_head import build_lm_head
from engine.kernels.norm_act import build_norm_act
from engine.kv.pool import KVLayout, PagePool, available_memory_bytes, pages_for_budget
from engine.layers.attention import create_backend
from engine.layers.attention.base import AttentionBatch, ForwardContext
from engine.layers.linear import pack_bf16_weights
from engine.layers.mlp import use_norm_act
from engine.models import model_class
from engine.options import EngineOptions
from engine.parallel.dp import gather_rows, is_idle, split_plan
from engine.parallel.group import Parallel
from engine.parallel.ranks import RankFailure, RankGroup
from engine.parallel.step import StepPlan, decode_plans, encode_plans
from engine.prompt_logprobs import PromptRows, reduce_rows, reduced_width
from engine.sampler import SampleOutput, Sampler, plain_greedy
from engine.scheduler import ScheduledBatch
from engine.weights import iter_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """Requests that sampled this step, their tokens, and the logits they were drawn from."""

    sampled: list[Any]
    output: SampleOutput | None
    logits: torch.Tensor | None


PAGES_AGREE_TIMEOUT_S = 900.0  # ranks wait this long for each other to load their weights


def use_device(device: torch.device) -> None:
    """Make a CUDA device that names its index this process's current one (Triton and NCCL
    launch on the current device); a bare `cuda` is the current one already."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def load_model(
    model_cfg: ModelConfig, path: str, dtype: torch.dtype, device: str, tp: Parallel | None = None
) -> Any:
    """Build the model for `model_cfg` (this rank's slice) and load the checkpoint into it.

    Parameters are made in `dtype` on `device` from the start: a float32 build cast after the
    load would hold twice a bf16 model's bytes on the GPU (an 80 GB card could not load a 20B
    model), and leave the float32 blocks in torch's cache where the KV pool is sized."""
    with torch.device(device), default_dtype(dtype):
        model = model_class(model_cfg)(model_cfg, tp)
    model.load_weights(iter_weights(path, model_cfg.fp8))
    return model.to(dtype=dtype).eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Floating tensors made without a dtype in the block take `dtype` (torch's default dtype
    is process-wide: the block is a model's construction, nothing else runs torch then)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def kv_layout(model_cfg: ModelConfig, dtype: torch.dtype, tp: Parallel | None = None) -> KVLayout:
    """This rank's KV layout: its KV heads (MHA/GQA), or the whole latent (MLA)."""
    if model_cfg.mla is not None:
        mla = model_cfg.mla
        return KVLayout.mla(model_cfg.num_layers, mla.kv_lora_rank, mla.qk_rope_head_dim, dtype)
    heads = (tp or Parallel.single()).kv_heads(model_cfg.num_kv_heads)[1]
    return KVLayout.mha(model_cfg.num_layers, heads, model_cfg.head_dim, dtype)


class ModelRunner(GraphSteps):
    def __init__(
        self,
        model_path: str,
        options: EngineOptions,
        model_cfg: ModelConfig,
        eos_token_ids: frozenset[int],
        *,
        keep_logits: bool = False,
        group: RankGroup | None = None,
    ) -> None:
        self.options, self.group = options, group
        self.keep_logits = keep_logits  # callers read StepResult.logits: never skip them
        self.model_cfg = model_cfg
        self.device = torch.device(options.device)
        use_device(self.device)
        self.dtype = parse_dtype(options.dtype) if options.dtype else model_cfg.dtype
        tp = group.parallel if group is not None else Parallel.single()
        self.exchange = tp.exchange  # how the MoE layers meet the other ranks, step by step
        self.model = load_model(model_cfg, model_path, self.dtype, options.device, tp)
        layout = kv_layout(model_cfg, self.dtype, tp)
        num_pages = self._num_pages(layout)
        if group is not None:  # the page ids rank 0 hands out must exist on every rank
            num_pages = group.agree_min("kv_pages", num_pages, PAGES_AGREE_TIMEOUT_S)
        self.pool = PagePool(layout, num_pages, options.page_size, options.device)
        self.attention = create_backend(
            options.attention_backend, self.pool, model_cfg.softmax_scale
        )
        self.lm_head_kernel = None
        self.shard_head_kernel = None  # TP: this rank's vocabulary slice, collectives around it
        self.fused_decode = None
        if options.cpu_kernels and self.device.type == "cpu":
            self._use_cpu_kernels(tp)
            if self.fused_decode is None:  # NOTE: a fused decode step reads its own copies
                packed = pack_bf16_weights(self.model)
                log.info("bfloat16 weights packed for oneDNN: %d MiB", packed >> 20)
        self.sampler = Sampler(eos_token_ids, seed=options.seed)
        log.info(
            "model loaded: %s, %d KV pages of %d tokens",
            model_cfg.family,
            self.pool.total_pages,
            options.page_size,
        )
        self.decode_graphs: DecodeGraphs | None = None
        if self._graphs_apply():
            self.use_decode_graphs(capture=True)

    def _use_cpu_kernels(self, tp: Parallel) -> None:
        """The native CPU paths (engine/kernels/), each off by itself where it cannot run.
        With several ranks the LM head kernel computes this rank's vocabulary slice (the
        layers' collectives run around it; under DP attention the whole vocabulary), and
        whole-layer fused decode is off."""
        keep_freed_memory_mapped()
        threads = torch.get_num_threads()
        use_norm_act(self.model, build_norm_act(threads))
        kernel = build_lm_head(self.model.lm_head_weight, threads)
        if tp.dp:  # DP attention: the LM head is whole here; the MoE layers meet the ranks
            self.lm_head_kernel = kernel
            return
        if tp.size > 1:
            self.shard_head_kernel = kernel
            return
        self.lm_head_kernel = kernel
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
        plan, sampled, prompt = self.plan(batch)
        if self.group is None:
            tokens, logits, reduced = self.execute(plan, self._grammar_mask(plan, sampled))
        else:
            owners = [r.dp_rank for r in batch.reqs]
            tokens, logits, reduced = self._execute_in_group(self.group, plan, owners)
        if reduced is not None:
            prompt.scatter(reduced)
        if not sampled:
            return StepResult([], None, None)
        if tokens is not None:
            return StepResult(sampled, SampleOutput(tokens.tolist()), None)
        params, states = [r.params for r in sampled], [r.sampler_state for r in sampled]
        return StepResult(sampled, self.sampler(logits, params, states), logits)

    def _execute_in_group(self, group: RankGroup, plan: StepPlan, owners: list[int]) -> Any:
        """Broadcast and run the plan; any failure on the way ends the group for good."""
        group.check()
        try:
            if not group.parallel.dp:
                group.send(plan.encode())
                return self.execute(plan)
            plans = split_plan(plan, owners, group.size)
            group.send(encode_plans(plans))
            return self.execute_dp(plans)
        except Exception as exc:
            group.fail(f"a step failed: {type(exc).__name__}: {exc}")
            raise RankFailure(group.failure) from exc

    def plan(self, batch: ScheduledBatch) -> tuple[StepPlan, list[Any], PromptRows]:
        """The step as plain lists (what every rank runs), the requests that sample, and the
        rows of prompt logprobs."""
        ids, logit_rows, sampled, page_tables = [], [], [], []
        row, page_size, prompt = 0, self.pool.page_size, PromptRows()
        kv_lens = [r.num_computed + n for r, n in zip(batch.reqs, batch.num_tokens)]
        for req, n, samples, kv_len in zip(batch.reqs, batch.num_tokens, batch.samples, kv_lens):
            ids.extend(req.token_slice(req.num_computed, req.num_computed + n))
            page_tables.append(list(req.page_table[: -(-kv_len // page_size)]))
            prompt.add(req, n, row)
            row += n
            if samples:
                logit_rows.append(row - 1)
                sampled.append(req)
        mode = "none"
        if sampled:
            states = [r.sampler_state for r in sampled]
            masked = self._masked_argmax()
            params = [r.params for r in sampled]
            greedy = not self.keep_logits and plain_greedy(params, states, masked)
            mode = "argmax" if greedy else "logits"
        plan = StepPlan(
            ids, list(batch.num_tokens), kv_lens, page_tables, logit_rows, mode,
            prompt.rows, prompt.targets, prompt.top,
        )  # fmt: skip
        return plan, sampled, prompt

    def follow(self, data: bytes) -> None:
        """Ranks 1..: run the step rank 0 broadcast."""
        if self.group is not None and self.group.parallel.dp:
            self.execute_dp(decode_plans(data))
        else:
            self.execute(StepPlan.decode(data))

    def execute_dp(self, plans: list[StepPlan]) -> tuple[Any, Any, Any]:
        """DP attention: run this rank's plan, then gather every rank's sampled rows (greedy
        ids or logits) and prompt-logprob rows, in rank order, onto every rank."""
        assert self.group is not None
        tp = self.group.parallel
        mine, counts = plans[tp.rank], [len(p.logit_rows) for p in plans]
        bucket_rows = self._dp_bucket_rows(plans)
        reduced = None
        if bucket_rows is not None:  # every rank replays its graph of the same bucket
            idle = AttentionBatch([], [], [], self.pool.page_size)  # an idle rank: no rows
            batch = idle if is_idle(mine) else self._attention_batch(mine)
            tokens, logits = self._execute_static(mine, batch, bucket_rows)
        else:  # every rank eager, alike; decode steps exchange at the most tokens a rank has
            decode = all(p.decodes_only() for p in plans)
            rows = max(len(p.ids) for p in plans) if decode else None
            plan = mine if mine.logit_rows else replace(mine, mode="none")
            tokens, logits, reduced = self.execute(plan, replay=False, fixed_rows=rows)
        prompt_counts = [len(p.prompt_rows) for p in plans]
        if any(prompt_counts):
            if reduced is None:
                width = reduced_width(max(p.prompt_top for p in plans))
                reduced = torch.zeros(0, width, dtype=torch.float64, device=self.device)
            reduced = gather_rows(tp, reduced, prompt_counts)
        if mine.mode == "argmax":
            ids = torch.zeros(0, dtype=torch.long) if tokens is None else tokens.long()
            return gather_rows(tp, ids.to(self.device), counts), None, reduced
        if mine.mode == "logits":
            if logits is None:
                logits = torch.zeros(0, self.model_cfg.vocab_size, device=self.device)
            return None, gather_rows(tp, logits, counts), reduced
        return None, None, reduced

    def _masked_argmax(self) -> bool:
        """Whether greedy constrained rows can take the argmax path: one rank whose CPU LM
        head takes a grammar's bitmask."""
        kernel = self.lm_head_kernel
        return self.group is None and kernel is not None and kernel.masks

    def _grammar_mask(self, plan: StepPlan, sampled: list[Any]) -> torch.Tensor | None:
        """An argmax step's token bitmask, when a row samples under a grammar."""
        rows = [i for i, r in enumerate(sampled) if r.sampler_state.matcher is not None]
        if plan.mode != "argmax" or not rows:
            return None
        matchers = [sampled[i].sampler_state.matcher for i in rows]
        return token_bitmask(len(sampled), self.model_cfg.vocab_size, rows, matchers)

    def execute(
        self,
        plan: StepPlan,
        allowed: torch.Tensor | None = None,
        *,
        replay: bool = True,
        fixed_rows: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Run the plan's forward on this rank: (greedy token ids, None), (None, float32 logits)
        or (None, None), as `plan.mode` asks, then the plan's prompt-logprob rows reduced (or
        None); `allowed`, a grammar's token bitmask for an argmax step (only where
        `_masked_argmax`). Through the decode graphs where the step fits them and `replay`
        allows. A decode step exchanges the experts' tokens at a fixed capacity (DP attention:
        `fixed_rows`, the most tokens a rank has), others at sizes the ranks tell each other."""
        batch = self._attention_batch(plan)
        if replay and self._replays(plan, batch):
            return (*self._execute_static(plan, batch), None)
        meta = self.attention.prepare(batch)
        input_ids = torch.tensor(plan.ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(plan.positions(), dtype=torch.long, device=self.device)
        if self.fused_decode is not None and not meta.extends and meta.decode_rows is not None:
            hidden = self.fused_decode(input_ids, pos, meta)  # every row decodes: one call
        else:
            if self.group is not None and not self.group.parallel.dp and plan.decodes_only():
                fixed_rows = len(plan.ids)  # the same plan on every rank
            with self.exchange.fixed(fixed_rows):
                hidden = self.model(input_ids, pos, ForwardContext(self.attention, meta))
        reduced = None
        if plan.prompt_rows:  # NOTE: before the sampled rows, alike on every rank
            targets = torch.tensor(plan.prompt_targets, dtype=torch.long, device=self.device)
            rows = hidden[plan.prompt_rows]
            # NOTE: torch's LM head, not the native kernel, which streams the weight once per 16
            # rows: at 256 rows oneDNN's GEMM took 0.6x its time (hidden 896, 152k vocab)
            logits_of = self.model.compute_logits
            reduced = reduce_rows(rows, targets, plan.prompt_top, logits_of)
        return (*self._sampled_rows(plan, hidden, allowed), reduced)

    def _sampled_rows(
        self, plan: StepPlan, hidden: torch.Tensor, allowed: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if plan.mode == "none":
            return None, None
        rows = hidden[plan.logit_rows]
        kernel = self.lm_head_kernel
        if plan.mode == "argmax":
            # greedy with nothing else asked: no logits written out (or gathered over ranks)
            if kernel is not None:
                return kernel.argmax(rows, allowed), None
            shard = self.shard_head_kernel
            return self.model.greedy(rows, shard, shard.argmax if shard else None), None
        if kernel is not None:
            return None, kernel(rows)
        return None, self.model.compute_logits(rows, self.shard_head_kernel)
