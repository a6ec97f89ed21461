"""Reading checkpoint tensors: safetensors, single file or sharded with an index; FP8 block
weights (`X.weight` float8 plus `X.weight_scale_inv`) come out dequantized.

Tensors come out as references (`LazyTensor`, `Fp8Tensor`) that read only the slice a rank asks
for (`read(ref, rows, cols)`): a tensor-parallel rank never materializes a full weight, FP8 ones
included (only the scale blocks that cover the slice are read). Plain torch tensors are valid
references too, so a state dict loads the same way."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Union

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


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"


_SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}


class LazyTensor:
    """One tensor of an open safetensors file; `read` loads only the slice asked for."""

    def __init__(self, handle: Any, name: str) -> None:
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        kind = self._slice.get_dtype()
        self.dtype = _SAFETENSORS_DTYPES.get(kind, kind)  # a string for the types not listed

    def read(self, *index: slice) -> torch.Tensor:
        return self._slice[index] if index else self._slice[:]


class Fp8Tensor:
    """An FP8 block-quantized weight and its `weight_scale_inv`, dequantized slice by slice."""

    def __init__(self, weight: WeightRef, scale_inv: WeightRef, block: Any, name: str) -> None:
        self.weight, self.scale_inv, self.block, self.name = weight, scale_inv, block, name
        self.shape = tuple(weight.shape)
        self.dtype = torch.float32  # what reads return

    def read(self, *index: slice) -> torch.Tensor:
        if self.block is None:  # one scale per tensor
            return read(self.weight, *index).float() * read(self.scale_inv).float()
        if not index:
            return dequantize_block_fp8(
                read(self.weight), read(self.scale_inv), self.block, self.name
            )
        full = (*index, *[slice(None)] * (len(self.shape) - len(index)))
        lead, (rows, cols) = full[:-2], full[-2:]
        rows, cols = _bounds(rows, self.shape[-2]), _bounds(cols, self.shape[-1])
        (b0, b1), grid = self.block, _grid(self.shape[-2:], self.block)
        if tuple(self.scale_inv.shape[-2:]) != grid:
            raise ValueError(_grid_error(self.name, self.scale_inv.shape, self.shape, self.block))
        r0, c0 = rows.start // b0, cols.start // b1
        scale = read(
            self.scale_inv, *lead, slice(r0, -(-rows.stop // b0)), slice(c0, -(-cols.stop // b1))
        )
        scale = scale.float().repeat_interleave(b0, dim=-2).repeat_interleave(b1, dim=-1)
        r, c = rows.start - r0 * b0, cols.start - c0 * b1
        scale = scale[..., r : r + rows.stop - rows.start, c : c + cols.stop - cols.start]
        return read(self.weight, *lead, rows, cols).float() * scale


WeightRef = Union[torch.Tensor, LazyTensor, Fp8Tensor]  # noqa: UP007 - a runtime alias


def read(ref: WeightRef, *index: slice) -> torch.Tensor:
    """The tensor (or the slice of it, one slice per leading dimension) behind a reference."""
    if isinstance(ref, torch.Tensor):
        return ref[index] if index else ref
    return ref.read(*index)


def _is_fp8(ref: WeightRef) -> bool:
    return ref.dtype in FP8_DTYPES


def _bounds(index: slice, size: int) -> slice:
    start, stop, _ = index.indices(size)
    return slice(start, stop)


def _grid(shape: Any, block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _grid_error(name: str, scale_shape: Any, shape: Any, block: Any) -> str:
    return (
        f"{name}{SCALE_SUFFIX} has shape {tuple(scale_shape)} but weight "
        f"{tuple(shape)} in {list(block)} blocks needs a {_grid(shape[-2:], block)} grid "
        "(check weight_block_size in quantization_config)"
    )


def iter_weights(
    model_dir: str | Path, fp8: Fp8Config | None = None
) -> Iterator[tuple[str, WeightRef]]:
    """Yield (name, reference) for every tensor of the checkpoint; the files stay open (memory
    mapped) until the iteration ends, so a reference read later still works.

    With `fp8` (the config's quantization_config), FP8 weights come out as `Fp8Tensor`s that
    read dequantized to float32, and their `weight_scale_inv` tensors are consumed.
    """
    weights = _read_weights(model_dir)
    return _reject_fp8(weights) if fp8 is None else dequantize_fp8(weights, fp8.weight_block)


def _read_weights(model_dir: str | Path) -> Iterator[tuple[str, WeightRef]]:
    with contextlib.ExitStack() as files:
        for path in safetensors_files(model_dir):
            f = files.enter_context(safe_open(str(path), framework="pt"))
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, LazyTensor(f, name)


def _reject_fp8(weights: Iterable[tuple[str, WeightRef]]) -> Iterator[tuple[str, WeightRef]]:
    """Pass tensors through; an FP8 one without a quantization_config would load unscaled."""
    for name, tensor in weights:
        if _is_fp8(tensor):
            raise ValueError(
                f"checkpoint tensor {name!r} is {tensor.dtype} but config.json has no "
                "quantization_config (restore the checkpoint's fp8 quantization_config)"
            )
        yield name, tensor


def dequantize_fp8(
    weights: Iterable[tuple[str, WeightRef]], block: tuple[int, int] | None
) -> Iterator[tuple[str, WeightRef]]:
    """Pair every FP8 `X.weight` with its `X.weight_scale_inv` (either order, any shard) and
    yield `X.weight` as an `Fp8Tensor` (reads come out dequantized); others pass through."""
    fp8: dict[str, WeightRef] = {}
    scales: dict[str, WeightRef] = {}
    for name, tensor in weights:
        if name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX)
            if weight in fp8:
                yield weight, Fp8Tensor(fp8.pop(weight), tensor, block, weight)
            else:
                scales[weight] = tensor
        elif _is_fp8(tensor):
            if name in scales:
                yield name, Fp8Tensor(tensor, scales.pop(name), block, name)
            else:
                fp8[name] = tensor
        else:
            yield name, tensor
    _check_all_paired(fp8, scales)


def _check_all_paired(fp8: dict[str, WeightRef], scales: dict[str, WeightRef]) -> None:
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
    if tuple(scale_inv.shape[-2:]) != _grid((rows, cols), block):
        raise ValueError(_grid_error(name, scale_inv.shape, weight.shape, block))
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.float() * scale
