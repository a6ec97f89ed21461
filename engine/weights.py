"""Reading checkpoint tensors: safetensors, single file or sharded with an index."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors files, in index order when sharded."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} names shards that are not there: {', '.join(missing)} "
                "(copy the whole checkpoint directory)"
            )
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no model weights in {root}: expected model.safetensors or a sharded "
            "model.safetensors.index.json (only safetensors checkpoints are supported)"
        )
    return files


def iter_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, one shard open at a time."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)
