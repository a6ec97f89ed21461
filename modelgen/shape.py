"""The sizes of a tiny model, resolved: what the architecture table's config builders read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """The sizes `make_model` takes, resolved (no None left)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None


def default_context(rope_scaling: dict[str, Any] | None) -> int:
    """4096, or the context a rope scaling stretches to (Llama-3.1: 8 * 8192)."""
    if rope_scaling and "original_max_position_embeddings" in rope_scaling:
        factor = float(rope_scaling.get("factor", 1.0))
        return int(factor * rope_scaling["original_max_position_embeddings"])
    return 4096
