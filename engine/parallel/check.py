"""Whether a model splits over a rank group as asked, checked before anything loads: each error
names the sizes and the tp_size/ep_size values that would work."""

from __future__ import annotations

import os

import torch

from engine.config import ModelConfig
from engine.options import EngineOptions


def divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_parallel(cfg: ModelConfig, options: EngineOptions) -> None:
    """Raise ValueError unless `cfg` splits over options.tp_size ranks (and ep_size)."""
    tp = options.tp_size
    if options.dp_attention and (cfg.mla is None or cfg.moe is None):
        raise ValueError(
            f"dp_attention is for MLA MoE models such as DeepSeek-V3 ({cfg.family} has "
            f"{'no MLA' if cfg.mla is None else 'no experts'}): use plain tp_size"
        )
    sizes = [("attention heads", cfg.num_heads), ("MLP intermediate size", cfg.intermediate_size)]
    if cfg.mla is None and cfg.num_kv_heads >= tp:
        sizes.append(("KV heads", cfg.num_kv_heads))
    if cfg.moe is not None and options.ep_size == 1:
        sizes.append(("MoE intermediate size", cfg.moe.intermediate_size))
    if cfg.moe is not None and options.ep_size > 1:
        sizes.append(("routed experts", cfg.moe.num_experts))
        shared = cfg.moe.intermediate_size * cfg.moe.num_shared_experts
        if shared:
            sizes.append(("shared experts' intermediate size", shared))
    if options.dp_attention:  # attention, dense layers and shared experts stay whole
        sizes = [s for s in sizes if s[0] == "routed experts"]
    for what, n in sizes:
        if n % tp == 0:
            continue
        if what == "routed experts":
            raise ValueError(
                f"ep_size {tp} does not divide the model's {n} routed experts (use ep_size 1, "
                f"or tp_size = ep_size among: {divisors(n)})"
            )
        raise ValueError(
            f"tp_size {tp} does not divide the model's {n} {what} "
            f"(set tp_size to one of: {divisors(n)})"
        )
    if cfg.mla is None and cfg.num_kv_heads < tp and tp % cfg.num_kv_heads:
        raise ValueError(
            f"tp_size {tp} exceeds the model's {cfg.num_kv_heads} KV heads but is not a multiple "
            f"of them (set tp_size to a multiple of {cfg.num_kv_heads} or a divisor of it)"
        )
    if options.ep_size > 1 and cfg.moe is None:
        raise ValueError(
            f"ep_size {options.ep_size} needs a MoE model ({cfg.family} has no experts)"
        )
    _check_devices(options)


def _check_devices(options: EngineOptions) -> None:
    per_host = options.tp_size // options.nnodes
    if options.device.startswith("cuda"):
        have, first = torch.cuda.device_count(), torch.device(options.device).index or 0
        if first + per_host > have:
            raise ValueError(
                f"tp_size {options.tp_size} over {options.nnodes} host(s) needs {per_host} GPUs "
                f"per host, cuda:{first} to cuda:{first + per_host - 1} (one per rank from "
                f"engine.device {options.device!r} on), but this one has {have} (lower tp_size, "
                "raise nnodes or pick a lower device index)"
            )
    elif per_host > (os.cpu_count() or 1) * 4:
        raise ValueError(
            f"{per_host} ranks on a host of {os.cpu_count()} cores is too many (lower tp_size)"
        )
