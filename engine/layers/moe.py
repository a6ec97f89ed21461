"""Mixture of experts, DeepSeek style: a router picks `top_k` routed experts per token (grouped
top-k, optional correction bias), their outputs are summed by the routing weights, and shared
experts see every token.

`select_experts` is the routing rule as a pure function; `MoE` is the layer. Expert weights are
stacked per projection (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], the transformers v5
layout), and load from per-expert checkpoint tensors (`experts.{e}.gate_proj.weight`) too.
Parallelism lives here, so model files stay pure math. Without expert parallelism every rank
holds every expert with a slice of its intermediate size (like a dense MLP). With it
(`tp.ep`), rank r holds experts [r * E/ep, (r + 1) * E/ep) whole: each rank routes its share
of the tokens, sends them to the experts' ranks with all-to-alls, and gets the results back
the same way (engine/layers/ep.py: at a fixed capacity in decode steps and wherever it moves no
more, else sized on the host). Shared experts are sliced like dense
MLPs either way; the routed and shared partial sums meet in one all-reduce. Under DP attention
(`tp.dp`) each rank's tokens are its own: it routes all of them, holds the shared experts
whole, and needs no all-reduce.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from engine.arch_config import MoEConfig
from engine.layers.ep import dispatch_combine, exchange_fixed, token_share
from engine.layers.linear import copy_checked, copy_slice, linear
from engine.layers.mlp import GatedMLP
from engine.parallel.group import Parallel
from engine.weights import Fp8Tensor, WeightRef, read

if TYPE_CHECKING:
    from engine.kernels.triton_moe import BlockFp8

# per-expert checkpoint projection -> (stacked parameter, half of gate_up_proj or None)
EXPERT_PROJECTIONS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def select_experts(
    router_logits: torch.Tensor, bias: torch.Tensor | None, cfg: MoEConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] float32, expert ids [T, top_k]) for router logits [T, E].

    The correction `bias` only steers which experts win (V3's aux-loss-free balancing); the
    weights are the unbiased scores of the winners, renormalised if `norm_topk_prob`, times
    `routed_scaling_factor`. Grouped methods first keep the `topk_groups` best expert groups.
    """
    logits = router_logits.float()
    scores = logits.sigmoid() if cfg.scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    if cfg.topk_method != "greedy" and cfg.num_groups > 1:
        choice = keep_best_groups(choice, cfg)
    ids = choice.topk(cfg.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def keep_best_groups(choice: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """`choice` with the experts outside the `topk_groups` best groups set to -inf.

    A group's rank: the sum of its two best scores (noaux_tc) or its best one (V2).
    """
    grouped = choice.view(-1, cfg.num_groups, cfg.experts_per_group)
    if cfg.topk_method == "noaux_tc":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    best = group_scores.topk(cfg.topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view_as(choice)


class Router(nn.Module):
    """Router weight [E, H] and V3's e_score_correction_bias, computed in float32."""

    def __init__(self, hidden_size: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        biased = cfg.topk_method == "noaux_tc"
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(cfg.num_experts, dtype=torch.float32)) if biased else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x.float(), self.weight.float())
        return select_experts(logits, self.e_score_correction_bias, self.cfg)

    def _apply(self, fn, recurse=True):
        # NOTE: the correction bias decides expert choice by small margins, so it stays float32
        # whatever dtype the model is cast to (transformers keeps it in fp32 too).
        bias = self.e_score_correction_bias
        kept = None if bias is None else bias.detach().float().clone()
        super()._apply(fn, recurse)
        if kept is not None:
            self.e_score_correction_bias.data = kept.to(self.e_score_correction_bias.device)
        return self


def fp8_experts_on_device(tp: Parallel) -> bool:
    """Whether experts built now (on the default device) keep FP8 weights: on a GPU whose
    Triton reads float8 (sm_89+: Ada, Hopper and later), with whole experts on each rank."""
    if torch.get_default_device().type != "cuda" or find_spec("triton") is None:
        return False
    return torch.cuda.get_device_capability() >= (8, 9) and (tp.ep or tp.size == 1)


class RoutedExperts(nn.Module):
    """This rank's experts as gated MLPs with stacked weights: every expert with a slice of its
    intermediate rows, or (expert parallel) a range of whole experts."""

    def __init__(
        self,
        hidden_size: int,
        cfg: MoEConfig,
        tp: Parallel,
        use_fused: bool | None = None,
        keep_fp8: bool = False,
    ) -> None:
        super().__init__()
        # NOTE: the Triton grouped GEMMs (engine/kernels/triton_moe.py) replace the loop over
        # experts where this is set; by default where the model is built on a GPU (the GPU
        # path), and torch stays the CPU path and the reference.
        on_gpu = torch.get_default_device().type == "cuda"
        self.use_fused = (
            on_gpu and find_spec("triton") is not None if use_fused is None else use_fused
        )
        self.fp8: tuple[BlockFp8, BlockFp8] | None = None  # keep_fp8: (gate_up, down) in FP8
        self._fp8_refs: dict[int, dict[str, Fp8Tensor]] | None = None
        self.tp_sliced = not tp.ep and tp.size > 1
        self.num_experts, self.full_intermediate = cfg.num_experts, cfg.intermediate_size
        if tp.ep:
            e = tp.split(cfg.num_experts, "n_routed_experts")
            self.first_expert, self.slice_start, i = tp.rank * e, 0, cfg.intermediate_size
        else:
            e, i = cfg.num_experts, tp.split(cfg.intermediate_size, "moe_intermediate_size")
            self.first_expert, self.slice_start = 0, tp.rank * i
        self.intermediate_size, self.local_experts = i, e
        if keep_fp8:  # NOTE: never made: DeepSeek-V3's are 22 GB a layer in bf16
            self.keep_fp8()
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, hidden_size))
            self.down_proj = nn.Parameter(torch.empty(e, hidden_size, i))

    def keep_fp8(self) -> None:
        """Before loading an FP8 block-quantized checkpoint: keep the experts' weights in FP8
        with their block scales (the fused kernels dequantize tile by tile) instead of
        dequantizing them on load; the stacked parameters then stay empty (`keep_fp8=True` at
        construction never makes them)."""
        if self.tp_sliced:
            raise ValueError(
                "FP8 experts stay FP8 only whole (ep_size = tp_size, or tp_size 1): a slice of "
                "the intermediate size would cut the scale blocks"
            )
        self.use_fused, self._fp8_refs = True, {}
        self.gate_up_proj = nn.Parameter(torch.empty(0), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(0), requires_grad=False)

    def finish_loading(self) -> None:
        """keep_fp8: stack this rank's experts' FP8 tensors (and scales) onto the device."""
        if self._fp8_refs is None:
            return
        from engine.kernels.triton_moe import stack_block_fp8

        local = range(self.first_expert, self.first_expert + self.local_experts)
        refs, device = self._fp8_refs, self.gate_up_proj.device
        gate_up = stack_block_fp8([[refs[e]["gate_proj"], refs[e]["up_proj"]] for e in local])
        down = stack_block_fp8([[refs[e]["down_proj"]] for e in local])
        self.fp8, self._fp8_refs = (gate_up.to(device), down.to(device)), None

    def _weights(self) -> tuple[object, object]:
        return self.fp8 or (self.gate_up_proj, self.down_proj)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Σ_k weights[t, k] * expert_{ids[t, k]}(x[t]) (ids global; every expert is here)."""
        return self.combine_local(x, weights, ids, skips=False)

    def combine_local(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, skips: bool = True
    ) -> torch.Tensor:
        """Σ_k weights[t, k] * expert_{ids[t, k]}(x[t]) over this rank's experts: ids local,
        and (`skips`) `local_experts` meaning no expert here, adding nothing."""
        if self.use_fused:
            from engine.kernels.triton_moe import fused_moe  # imports triton

            return fused_moe(x, *self._weights(), weights, ids, skips=skips)
        out = torch.zeros_like(x)
        for expert, picks in self._groups(ids.flatten()):
            tokens = picks // ids.shape[1]
            y = self._expert(expert, x[tokens]) * weights.flatten()[picks, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def compute(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Row i through this rank's expert local_ids[i], unweighted (expert parallel)."""
        if self.use_fused:
            from engine.kernels.triton_moe import fused_expert_rows

            return fused_expert_rows(x, *self._weights(), local_ids)
        out = torch.empty_like(x)
        for expert, picks in self._groups(local_ids):
            out[picks] = self._expert(expert, x[picks]).to(out.dtype)
        return out

    def _groups(self, ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(local expert, positions in `ids` that pick it) for every expert here picked (an id
        of `local_experts` picks none)."""
        order = ids.argsort()
        counts = torch.bincount(ids, minlength=self.local_experts + 1).tolist()
        groups, start = [], 0
        for expert, n in enumerate(counts):
            if n and expert < self.local_experts:
                groups.append((expert, order[start : start + n]))
                start += n
        return groups

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj[expert])

    def load_expert(self, expert: int, proj: str, tensor: WeightRef, name: str) -> str:
        """Load one expert's `gate_proj`/`up_proj`/`down_proj` weight (this rank's slice, or
        nothing for another rank's expert); returns the piece seen."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(
                f"{name!r} is expert {expert} but the config has {self.num_experts} "
                "routed experts (n_routed_experts does not match the weights)"
            )
        local = expert - self.first_expert
        if self._fp8_refs is not None:
            if not isinstance(tensor, Fp8Tensor) or tensor.block is None:
                raise ValueError(
                    f"{name!r} is not FP8 with block scales, but the experts were set to stay FP8"
                )
            if 0 <= local < self.local_experts:
                self._fp8_refs.setdefault(expert, {})[proj] = tensor
            return f"{expert}.{proj}"
        if 0 <= local < self.local_experts:
            full, start = self.full_intermediate, self.slice_start
            if proj == "down_proj":
                copy_slice(self.down_proj[local], tensor, name, 1, start, full)
            else:
                half = EXPERT_PROJECTIONS[proj][1] * self.intermediate_size
                rows = self.gate_up_proj[local, half : half + self.intermediate_size]
                copy_slice(rows, tensor, name, 0, start, full)
        return f"{expert}.{proj}"

    def load_stacked(self, param: str, tensor: WeightRef, name: str) -> list[str]:
        """Load a stacked `gate_up_proj`/`down_proj` [E, ...] tensor; returns the pieces seen."""
        if self._fp8_refs is not None:
            raise ValueError(
                f"{name!r}: experts kept in FP8 load from per-expert tensors (DeepSeek-V3's "
                "layout), not stacked ones"
            )
        target = getattr(self, param)
        e, i, full = target.shape[0], self.intermediate_size, self.full_intermediate
        experts = slice(self.first_expert, self.first_expert + e)
        shape = (self.num_experts, *target.shape[1:])
        shape = (shape[0], 2 * full, shape[2]) if param == "gate_up_proj" else (*shape[:2], full)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"weight {name!r} has shape {tuple(tensor.shape)} but the config implies "
                f"{shape} (config.json does not match the weights)"
            )
        a = self.slice_start
        if param == "down_proj":
            copy_checked(target, read(tensor, experts, slice(None), slice(a, a + i)), name)
        else:
            gate = read(tensor, experts, slice(a, a + i))
            up = read(tensor, experts, slice(full + a, full + a + i))
            copy_checked(target, torch.cat([gate, up], dim=1), name)
        projs = ("gate_proj", "up_proj") if param == "gate_up_proj" else ("down_proj",)
        return [f"{x}.{p}" for x in range(self.num_experts) for p in projs]

    def pieces(self) -> set[str]:
        """Every piece `load_expert` must see (or a stacked tensor covers) for a full load."""
        projs = ("gate_proj", "up_proj", "down_proj")
        return {f"{e}.{p}" for e in range(self.num_experts) for p in projs}


class MoE(nn.Module):
    """Routed experts weighted by the router, plus the shared experts on every token."""

    def __init__(
        self, hidden_size: int, cfg: MoEConfig, tp: Parallel, keep_fp8: bool = False
    ) -> None:
        super().__init__()
        self.tp = tp
        self.gate = Router(hidden_size, cfg)
        self.experts = RoutedExperts(hidden_size, cfg, tp, keep_fp8=keep_fp8)
        shared = cfg.intermediate_size * cfg.num_shared_experts
        dense = tp.dense
        self.shared_experts = GatedMLP(hidden_size, shared, dense, reduce=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.tp.exchange.fixed_rows
        if self.tp.dp:  # DP attention: x is this rank's own tokens, the result is whole here
            out = self._routed(x, rows)
            if self.shared_experts is not None:
                out += self.shared_experts(x)
            return out
        if self.tp.ep:
            lo, hi = token_share(len(x), self.tp)  # this rank routes its share of the tokens
            out = torch.zeros_like(x)
            # every rank holds the same tokens, so the fixed capacity needs no word from the
            # runner; outside decode steps it is taken where it moves no more rows than the
            # pair-wise exchange (ranks <= top_k)
            fixed = rows is not None or self.tp.size <= self.gate.cfg.top_k
            share = -(-len(x) // self.tp.size) if fixed else None
            out[lo:hi] = self._routed(x[lo:hi], share)
        else:
            out = self.experts(x, *self.gate(x))
        if self.shared_experts is not None:
            out += self.shared_experts(x)
        return self.tp.all_reduce(out)

    def _routed(self, x: torch.Tensor, rows: int | None) -> torch.Tensor:
        """The routed experts' sum for this rank's tokens `x`, over the ranks that hold them:
        at a fixed capacity of `rows` per rank, or (None) at the sizes the ranks tell each
        other (`TokenExchange`)."""
        weights, ids = self.gate(x)
        if rows is not None:
            return exchange_fixed(self.experts, x, weights, ids, self.tp, rows)
        return dispatch_combine(self.experts, x, weights, ids, self.tp)
