"""`MakeSpec`: the arguments of a tiny model, one type for the CLI flags and the cluster YAML.

`pdserve make-model`'s flags are built from its fields (`--kv-heads` from `kv_heads`, with the
field's default, help and choices), and a cluster config's `model.make` is read into it by the
YAML schema (cluster/schema.py, which reads the type hints), so the two never drift apart.
cluster/modelcache.py hashes the fields into the cache directory's name: renaming a field or
changing a default moves every cached model.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from modelgen.archs import ARCHS
from modelgen.tokenizers import tokenizer_specs

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class MakeSpec:
    """Arguments of `modelgen.make.make_model` (see `pdserve make-model --help`)."""

    arch: str = field(metadata={"help": "the architecture", "choices": tuple(ARCHS)})
    layers: int = field(default=2, metadata={"help": "decoder layers"})
    hidden: int = field(default=64, metadata={"help": "hidden size"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads (GQA)"})
    intermediate: int | None = field(
        default=None, metadata={"help": "MLP intermediate size (default: 3 * hidden)"}
    )
    seed: int = field(default=0, metadata={"help": "random seed of the weights"})
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "default: the arch's (deepseek for DeepSeek archs, else qwen)",
            "choices": tuple(tokenizer_specs()),
        },
    )
    dtype: str = field(default="float32", metadata={"help": "weight dtype", "choices": DTYPES})
    fp8: bool = field(default=False, metadata={"help": "FP8 block weights, as DeepSeek-V3 ships"})

    def __post_init__(self) -> None:
        """The checks that need no model files, so a config fails at load (and `--dry-run`)."""
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"{f.name} {value!r} is unknown (use one of {', '.join(choices)})")
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads must be a multiple of kv_heads ({self.heads}, {self.kv_heads})"
            )
        if self.hidden % self.heads:
            raise ValueError(f"hidden must be a multiple of heads ({self.hidden}, {self.heads})")

    def make_kwargs(self) -> dict[str, Any]:
        """`make_model`'s keyword arguments: the fields set, less the arch (and a None tokenizer,
        which make_model resolves to the arch's own)."""
        kwargs = dataclasses.asdict(self)
        del kwargs["arch"]
        if kwargs["tokenizer"] is None:
            del kwargs["tokenizer"]
        return kwargs


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `MakeSpec` field: `--kv-heads` for `kv_heads`; required where it has no
    default; a bool field is a switch."""
    hints = typing.get_type_hints(MakeSpec)
    for f in dataclasses.fields(MakeSpec):
        parser.add_argument(f"--{f.name.replace('_', '-')}", **flag_options(f, hints[f.name]))


def flag_options(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """`add_argument`'s keywords for field `f` whose type hint is `hint`."""
    options: dict[str, Any] = {"help": f.metadata["help"]}
    if "choices" in f.metadata:
        options["choices"] = f.metadata["choices"]
    if f.default is dataclasses.MISSING:
        options["required"] = True
    else:
        options["default"] = f.default
    if hint is bool:
        options["action"] = "store_true"
    else:
        options["type"] = scalar_type(hint)
    return options


def scalar_type(hint: Any) -> type:
    """`int` for `int` and `int | None` alike."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def spec_from_flags(args: argparse.Namespace) -> MakeSpec:
    """The `MakeSpec` that the flags of `add_flags` parsed into."""
    return MakeSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MakeSpec)})
