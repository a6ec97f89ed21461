"""A model runner's decode steps through static tensors: CUDA graphs on a GPU, one per batch-size
bucket (engine/cuda_graph.py), or the same body eagerly over the same tensors in CPU tests.

When a step replays: decode-only, every row sampling, within the largest bucket and the static
page tables. On one rank or every rank of a group: every rank decides alike from the broadcast
plan (`_replays`; under DP attention `_dp_bucket_rows` from every rank's plan), fills its own
static tables and replays its own graph at the same bucket, and the layers' collectives are
captured inside it (the step's broadcast stays outside, on the host). Expert parallelism
exchanges tokens at a fixed capacity there (engine/layers/ep.py `exchange_fixed`). Every rank
captures the same buckets in the same order, so their collectives pair up.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from engine.config import ModelConfig
from engine.cuda_graph import MAX_GRAPH_BATCH, DecodeGraphs, HostSyncError, graph_buckets
from engine.kv.pool import PagePool
from engine.layers.attention.base import AttentionBackend, AttentionBatch, ForwardContext
from engine.options import EngineOptions
from engine.parallel.dp import is_idle
from engine.parallel.group import TokenExchange
from engine.parallel.step import StepPlan

log = logging.getLogger(__name__)


class GraphSteps:
    """The decode-graph half of `ModelRunner` (engine/runner.py), over its attributes below."""

    device: torch.device
    options: EngineOptions
    model_cfg: ModelConfig
    model: Any
    pool: PagePool
    attention: AttentionBackend
    exchange: TokenExchange
    decode_graphs: DecodeGraphs | None

    def _graphs_apply(self) -> bool:
        """CUDA graphs for decode steps: on CUDA, asked for, over a backend with static decode
        tables (triton)."""
        return (
            self.device.type == "cuda"
            and self.options.cuda_graphs
            and hasattr(self.attention, "static_decode")
        )

    @torch.inference_mode()
    def use_decode_graphs(self, capture: bool = True) -> None:
        """Run decode-only steps of up to min(max_running, MAX_GRAPH_BATCH) requests through
        static tensors at batch-size buckets (engine/cuda_graph.py): captured CUDA graphs,
        replayed; or with capture=False the same body eagerly over the same tensors (what CPU
        tests check against the eager path). A body a graph cannot hold leaves steps eager."""
        max_len = self.options.max_model_len or self.model_cfg.max_position_embeddings
        max_pages = min(-(-max_len // self.pool.page_size), self.pool.total_pages)
        buckets = graph_buckets(min(self.options.max_running, MAX_GRAPH_BATCH))
        static_decode = getattr(self.attention, "static_decode", None)
        if static_decode is None:
            raise ValueError(
                f"attention backend {type(self.attention).__name__} keeps no static decode "
                "tables (decode graphs need attention_backend='triton')"
            )
        tables = static_decode(buckets[-1], max_pages)
        try:
            self.decode_graphs = DecodeGraphs(
                self._decode_body, tables, self.device, buckets, capture=capture
            )
        except HostSyncError as exc:
            log.warning(
                "decode steps run eager: the model syncs with the host inside a step, which a "
                "CUDA graph cannot hold (%s); set cuda_graphs: false to skip the attempt",
                exc,
            )

    def _decode_body(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step whose every row samples: (greedy ids [B], float32 logits [B, V]).
        One LM head for both: a graph's step cannot choose between them by the plan."""
        with self.exchange.fixed(len(input_ids)):
            hidden = self.model(input_ids, positions, ForwardContext(self.attention, meta))
        logits = self.model.compute_logits(hidden)
        return logits.argmax(dim=-1), logits

    def _replays(self, plan: StepPlan, batch: AttentionBatch) -> bool:
        """Whether this step runs through the decode graphs: decode-only, every row sampling
        (and none reporting a prompt logprob), within the largest bucket and the static page
        tables."""
        graphs = self.decode_graphs
        return (
            graphs is not None
            and plan.mode != "none"
            and len(plan.logit_rows) == len(plan.q_lens)
            and not plan.prompt_rows
            and graphs.fits(batch)
        )

    def _attention_batch(self, plan: StepPlan) -> AttentionBatch:
        return AttentionBatch(plan.q_lens, plan.kv_lens, plan.page_tables, self.pool.page_size)

    def _dp_bucket_rows(self, plans: list[StepPlan]) -> int | None:
        """DP attention: the rows every rank pads its decode graph's bucket to, where every
        rank's plan replays (or idles); None where the step runs eager on every rank. Each rank
        sees every plan, so all decide alike."""
        live = [p for p in plans if not is_idle(p)]
        if not live or not all(self._replays(p, self._attention_batch(p)) for p in live):
            return None
        return max(len(p.q_lens) for p in live)

    def _execute_static(
        self, plan: StepPlan, batch: AttentionBatch, bucket_rows: int = 0
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        assert self.decode_graphs is not None
        rows = len(batch.q_lens)
        ids, positions = plan.ids[:rows], plan.positions()[:rows]  # an idle plan: no rows
        ids, logits = self.decode_graphs.run(ids, positions, batch, bucket_rows)
        if plan.mode == "argmax":
            return ids, None
        return None, logits.clone()  # the static logits: the next step overwrites them
