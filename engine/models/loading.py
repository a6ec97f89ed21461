"""Checkpoint loading that every model shares: one tensor into the module that owns it (each
layer reads its own slice), and the check that nothing is missing."""

from __future__ import annotations

from torch import nn

from engine.layers.linear import MergedLinear, copy_checked
from engine.weights import WeightRef


def load_param(model: nn.Module, key: str, tensor: WeightRef, name: str, family: str) -> str:
    """Load HF tensor `name` (our parameter `key`) into its module; returns the key."""
    module_name, _, kind = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        param = module.get_parameter(kind)
    except AttributeError:
        raise ValueError(
            f"unexpected weight {name!r} in checkpoint (not a {family} weight)"
        ) from None
    if hasattr(module, "load_param"):
        module.load_param(kind, tensor, name)
    else:
        copy_checked(param, tensor, name)
    return key


def check_complete(
    model: nn.Module, loaded: set[str], pieces: dict[str, set[str]] | None = None
) -> None:
    """Raise unless every parameter (every part of a merged one, every piece in `pieces` by
    module name) was loaded."""
    expected: set[str] = set()
    for key, _ in model.named_parameters():
        module_name, _, _kind = key.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, MergedLinear):
            expected.update(f"{key}#{i}" for i in range(len(module.out_sizes)))
        elif pieces is not None and module_name in pieces:
            expected.update(f"{module_name}#{piece}" for piece in pieces[module_name])
        else:
            expected.add(key)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(m.split("#")[0] for m in missing[:5])
        raise ValueError(
            f"checkpoint is missing {len(missing)} weights, e.g. {shown} "
            "(the safetensors files are incomplete or belong to another model)"
        )
