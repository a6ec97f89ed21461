"""Can this prefill write into that decode? Checked once, when decode registers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import IncompatiblePeerError
from .buffers import KVBuffer


@dataclass(frozen=True)
class KVCompat:
    """What both sides must agree on before any page moves."""

    model: str
    dtype: str
    page_size: int
    num_layers: int
    kv_layout: str  # "mha" (K and V per layer) or "mla" (one latent buffer per layer)


_FIXES = {
    "model": "serve the same model on prefill and decode",
    "dtype": "set the KV cache dtype alike",
    "page_size": "set cache.page_size alike",
    "num_layers": "serve the same model on prefill and decode",
    "kv_layout": "serve the same model and attention backend on both",
}


def compat_errors(
    prefill: KVCompat,
    decode: KVCompat,
    prefill_buffers: Sequence[KVBuffer],
    decode_buffers: Sequence[KVBuffer],
) -> list[str]:
    """Every mismatch as a sentence naming both values and the fix; empty when compatible."""
    errors = [
        f"{name} differs: prefill {getattr(prefill, name)}, decode {getattr(decode, name)} ({fix})"
        for name, fix in _FIXES.items()
        if getattr(prefill, name) != getattr(decode, name)
    ]
    if len(prefill_buffers) != len(decode_buffers):
        errors.append(
            f"KV buffer count differs: prefill {len(prefill_buffers)}, decode "
            f"{len(decode_buffers)} (same model, layout and parallelism on both sides)"
        )
        return errors
    for i, (p, d) in enumerate(zip(prefill_buffers, decode_buffers, strict=True)):
        if p.page_bytes != d.page_bytes:
            errors.append(
                f"KV buffer {i} page bytes differ: prefill {p.page_bytes}, decode {d.page_bytes} "
                "(same model, dtype, page size and parallelism on both sides)"
            )
            break
    return errors


def check_compatible(
    prefill: KVCompat,
    decode: KVCompat,
    prefill_buffers: Sequence[KVBuffer],
    decode_buffers: Sequence[KVBuffer],
) -> None:
    """Raise IncompatiblePeerError listing every mismatch."""
    errors = compat_errors(prefill, decode, prefill_buffers, decode_buffers)
    if errors:
        raise IncompatiblePeerError("; ".join(errors))
