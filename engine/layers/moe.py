"""Mixture of experts, DeepSeek style: a router picks `top_k` routed experts per token (grouped
top-k, optional correction bias), their outputs are summed by the routing weights, and shared
experts see every token.

`select_experts` is the routing rule as a pure function; `MoE` is the layer. Expert weights are
stacked per projection (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], the transformers v5
layout), and load from per-expert checkpoint tensors (`experts.{e}.gate_proj.weight`) too.
Expert parallelism will slice the expert dimension here, so model files stay pure math.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.arch_config import MoEConfig
from engine.layers.linear import copy_checked, linear
from engine.layers.mlp import GatedMLP

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
            nn.Parameter(torch.empty(cfg.num_experts)) if biased else None
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


class RoutedExperts(nn.Module):
    """E gated MLPs with stacked weights; tokens are grouped by expert, one matmul per expert."""

    def __init__(self, hidden_size: int, cfg: MoEConfig) -> None:
        super().__init__()
        e, i = cfg.num_experts, cfg.intermediate_size
        self.intermediate_size = i
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(e, hidden_size, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        flat = ids.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            picks = order[start : start + n]
            start += n
            tokens = picks // ids.shape[1]
            y = self._expert(expert, x[tokens]) * weights.flatten()[picks, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj[expert])

    def load_expert(self, expert: int, proj: str, tensor: torch.Tensor, name: str) -> str:
        """Load one expert's `gate_proj`/`up_proj`/`down_proj` weight; returns the piece loaded."""
        if not 0 <= expert < self.gate_up_proj.shape[0]:
            raise ValueError(
                f"{name!r} is expert {expert} but the config has {self.gate_up_proj.shape[0]} "
                "routed experts (n_routed_experts does not match the weights)"
            )
        if proj == "down_proj":
            copy_checked(self.down_proj[expert], tensor, name)
        else:
            half = EXPERT_PROJECTIONS[proj][1] * self.intermediate_size
            rows = self.gate_up_proj[expert, half : half + self.intermediate_size]
            copy_checked(rows, tensor, name)
        return f"{expert}.{proj}"

    def load_stacked(self, param: str, tensor: torch.Tensor, name: str) -> list[str]:
        """Load a stacked `gate_up_proj`/`down_proj` [E, ...] tensor; returns the pieces loaded."""
        copy_checked(getattr(self, param), tensor, name)
        projs = ("gate_proj", "up_proj") if param == "gate_up_proj" else ("down_proj",)
        return [f"{e}.{p}" for e in range(self.gate_up_proj.shape[0]) for p in projs]

    def pieces(self) -> set[str]:
        """Every piece `load_expert` must see (or a stacked tensor covers) for a full load."""
        projs = ("gate_proj", "up_proj", "down_proj")
        return {f"{e}.{p}" for e in range(self.gate_up_proj.shape[0]) for p in projs}


class MoE(nn.Module):
    """Routed experts weighted by the router, plus the shared experts on every token."""

    def __init__(self, hidden_size: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.gate = Router(hidden_size, cfg)
        self.experts = RoutedExperts(hidden_size, cfg)
        shared = cfg.intermediate_size * cfg.num_shared_experts
        self.shared_experts = GatedMLP(hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        return out if self.shared_experts is None else out + self.shared_experts(x)
