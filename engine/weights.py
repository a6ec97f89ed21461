"""Reading checkpoint tensors: safetensors, single file or sharded with an index; FP8 block
weights (`X.weight` float8 plus `X.weight_scale_inv`) come out dequantized."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.arch_config import Fp8Config


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


def iter_weights(
    model_dir: str | Path, fp8: Fp8Config | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, one shard open at a time.

    With `fp8` (the config's quantization_config), FP8 weights come out dequantized to float32
    and their `weight_scale_inv` tensors are consumed.
    """
    weights = _read_weights(model_dir)
    return _reject_fp8(weights) if fp8 is None else dequantize_fp8(weights, fp8.weight_block)


def _read_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"


def _reject_fp8(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through; an FP8 one without a quantization_config would load unscaled."""
    for name, tensor in weights:
        if tensor.dtype in FP8_DTYPES:
            raise ValueError(
                f"checkpoint tensor {name!r} is {tensor.dtype} but config.json has no "
                "quantization_config (restore the checkpoint's fp8 quantization_config)"
            )
        yield name, tensor


def dequantize_fp8(
    weights: Iterable[tuple[str, torch.Tensor]], block: tuple[int, int] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pair every FP8 `X.weight` with its `X.weight_scale_inv` (either order, any shard) and
    yield `X.weight` dequantized; other tensors pass through."""
    fp8: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX)
            if weight in fp8:
                yield weight, dequantize_block_fp8(fp8.pop(weight), tensor, block, weight)
            else:
                scales[weight] = tensor
        elif tensor.dtype in FP8_DTYPES:
            if name in scales:
                yield name, dequantize_block_fp8(tensor, scales.pop(name), block, name)
            else:
                fp8[name] = tensor
        else:
            yield name, tensor
    _check_all_paired(fp8, scales)


def _check_all_paired(fp8: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> None:
    if fp8:
        raise ValueError(
            f"FP8 weight {next(iter(fp8))!r} has no {SCALE_SUFFIX} tensor (the checkpoint is "
            "incomplete: copy every safetensors shard)"
        )
    if scales:
        raise ValueError(
            f"{next(iter(scales))}{SCALE_SUFFIX} scales a weight that is missing or not FP8 "
            "(the checkpoint is incomplete or its quantization_config is wrong)"
        )


def dequantize_block_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None, name: str
) -> torch.Tensor:
    """weight * scale_inv, one scale per [block] tile (the last row/column tiles may be partial);
    works on stacked [..., rows, cols] weights too. float32 out."""
    if block is None:
        return weight.float() * scale_inv.float()
    rows, cols = weight.shape[-2:]
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape[-2:]) != grid:
        raise ValueError(
            f"{name}{SCALE_SUFFIX} has shape {tuple(scale_inv.shape)} but weight "
            f"{tuple(weight.shape)} in {list(block)} blocks needs a {grid} grid "
            "(check weight_block_size in quantization_config)"
        )
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.float() * scale
