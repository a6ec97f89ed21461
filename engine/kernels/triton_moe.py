"""The routed experts as two Triton grouped GEMMs (the GPU path of `RoutedExperts`), with expert
weights in bf16/fp16/fp32 or kept in FP8 with DeepSeek-V3's block scales.

The torch path loops over experts in Python, one small matmul pair each. Here, as in SGLang's and
vLLM's fused MoE, every (token, k) pair is sorted by its expert and each expert's run of pairs is
padded to the GEMM's row block (`align_pairs`), so one program of a kernel multiplies BLOCK_M pairs
of one expert by a tile of that expert's weights:

    pair p = t * top_k + k           the k-th choice of token t (ids.flatten() order)
    sorted   [e0 e0 e0 -- | e2 -- -- -- | e5 e5 e5 e5 | e5 -- -- --]   (-- padding, = num_pairs)
    blocks   [    e0      |     e2      |      e5     |      e5    ]   BLOCK_M = 4

`_gate_up_kernel` computes silu(x @ gate.T) * (x @ up.T) for its pairs into `act` [pairs, I];
`_down_kernel` computes act @ down.T times the routing weight into `per_pair` [pairs, H], each
row landing at its pair's index, and `fused_moe` sums a token's top_k rows in torch (no atomics:
the same inputs give the same bits). Accumulation is float32; blocks are >= 16 so tl.dot is legal
on GPU, and masks cover ragged edges (token counts, H and I need not be multiples of a block).

FP8 (`BlockFp8`): the kernels load float8 tiles and one float32 scale per (n-block, k-block)
weight tile, and apply it to the tile's partial product, so the weights stay FP8 in memory and
activations stay in the model dtype (no activation quantization). BLOCK_K divides the scale
block, so each K step meets one scale column. Triton reads float8_e4m3fn on sm_89 and later
(Ada, Hopper); an older GPU keeps the dequantize-on-load path.

The dots are engine/kernels/triton/common.py's `dot`, as the attention kernels': float32 in
full precision, and bfloat16 operands upcast under TRITON_INTERPRET=1 (CPU tests), whose
interpreter multiplies bfloat16 as raw bits (`upcast_dots`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.triton.common import dot, dot_precision, upcast_dots
from engine.weights import FP8_DTYPES, Fp8Tensor, dequantize_block_fp8, read

CHUNK_TOKENS = 8192  # tokens per pass: bounds the [pairs, I] and [pairs, H] buffers in prefill


@dataclass(frozen=True)
class MoEBlocks:
    """The kernels' tile: BLOCK_M pairs x BLOCK_N output columns, BLOCK_K deep per step."""

    m: int = 64
    n: int = 64
    k: int = 64

    def __post_init__(self) -> None:
        for name, size in dataclasses.asdict(self).items():
            if size < 16 or size & (size - 1):
                raise ValueError(f"MoE block {name}={size} must be a power of two >= 16 (tl.dot)")


def pick_blocks(num_pairs: int, num_experts: int, scale_block: tuple[int, int] | None) -> MoEBlocks:
    """A tile for this many pairs: small row blocks when experts see few pairs each (decode),
    so padding stays small; FP8 steps K by a divisor of the scale block."""
    per_expert = num_pairs / max(num_experts, 1)
    m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
    k = 64 if scale_block is None else _largest_block_dividing(scale_block[1], 128)
    return MoEBlocks(m=m, n=64, k=k)


def _largest_block_dividing(size: int, most: int) -> int:
    for block in (128, 64, 32, 16):
        if block <= most and size % block == 0:
            return block
    raise ValueError(
        f"FP8 scale block {size} along K is not a multiple of 16 (the fused MoE needs "
        "weight_block_size entries that are multiples of 16)"
    )


@dataclass(frozen=True)
class BlockFp8:
    """One stacked expert projection kept in FP8, with a float32 scale per [block] weight tile.

    `weight` [E, N, K] float8; `scale` [E, halves * ceil(N / halves / b0), ceil(K / b1)], the
    checkpoint's `weight_scale_inv` tiles. gate_up_proj has two halves (gate rows, then up rows)
    and keeps gate's scale rows, then up's: each half's last row block may be partial when the
    intermediate size is not a multiple of b0, as each was quantized on its own.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]
    halves: int = 1

    def __post_init__(self) -> None:
        if self.weight.dtype not in FP8_DTYPES or self.weight.ndim != 3:
            raise ValueError(
                f"BlockFp8 weight is {self.weight.dtype} {tuple(self.weight.shape)}; it takes "
                "stacked [experts, rows, cols] float8 weights"
            )
        if tuple(self.scale.shape) != self.scale_shape:
            raise ValueError(
                f"BlockFp8 scale has shape {tuple(self.scale.shape)} but weight "
                f"{tuple(self.weight.shape)} in {list(self.block)} blocks ({self.halves} "
                f"half/halves) needs {self.scale_shape} (check weight_block_size)"
            )

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def half_rows(self) -> int:
        return self.weight.shape[1] // self.halves

    @property
    def scale_shape(self) -> tuple[int, int, int]:
        (b0, b1), (e, _, k) = self.block, self.weight.shape
        return (e, self.halves * _cdiv(self.half_rows, b0), _cdiv(k, b1))

    def to(self, device: torch.device | str) -> BlockFp8:
        return dataclasses.replace(self, weight=self.weight.to(device), scale=self.scale.to(device))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [E, N, K] these tiles stand for (the torch path's weight)."""
        rows, scale_rows = self.half_rows, self.scale.shape[1] // self.halves
        halves = [
            dequantize_block_fp8(
                self.weight[:, h * rows : (h + 1) * rows],
                self.scale[:, h * scale_rows : (h + 1) * scale_rows],
                self.block,
                "BlockFp8",
            )
            for h in range(self.halves)
        ]
        return torch.cat(halves, dim=1)


def stack_block_fp8(per_expert: Sequence[Sequence[Fp8Tensor]]) -> BlockFp8:
    """One projection's `BlockFp8` from the checkpoint's FP8 tensors (`iter_weights` with a
    quantization_config yields them), still FP8: per_expert[e] is [gate, up] for gate_up_proj,
    [down] for down_proj, each holding its float8 weight and `weight_scale_inv`."""
    first = per_expert[0][0]
    if first.block is None:
        raise ValueError(
            f"{first.name} has one scale per tensor; the fused MoE reads block scales "
            "(a quantization_config with weight_block_size)"
        )
    weights = [torch.cat([read(t.weight) for t in parts]) for parts in per_expert]
    scales = [torch.cat([read(t.scale_inv).float() for t in parts]) for parts in per_expert]
    block = (int(first.block[0]), int(first.block[1]))
    return BlockFp8(torch.stack(weights), torch.stack(scales), block, halves=len(per_expert[0]))


@dataclass(frozen=True)
class AlignedPairs:
    """(token, k) pairs sorted by expert, each expert's run padded to a multiple of BLOCK_M.

    `pairs` [capacity] int32: pair indices (t * top_k + k), padding = num_pairs; `block_experts`
    [capacity / BLOCK_M]: the expert of each row block; `num_padded` [1]: the used length
    (blocks past it are skipped). Sizes follow the shapes alone: no host sync, graph-safe.
    """

    pairs: torch.Tensor
    block_experts: torch.Tensor
    num_padded: torch.Tensor


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """SGLang's `moe_align_block_size`, in torch: sort the pairs of `ids` [T, top_k] (expert
    ids in [0, num_experts]) by expert, stable, and pad every expert's run to block_m. An id of
    `num_experts` means no expert: that pair lands in no block."""
    flat = ids.flatten()
    num_pairs = flat.numel()
    # NOTE: not torch.bincount: on CUDA it reads its input's max on the host (a sync a CUDA
    # graph cannot hold)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0  # the pairs of no expert take no room
    padded_ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    experts = flat[order]
    rank_in_run = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[experts]
    capacity = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    capacity = _cdiv(capacity, block_m) * block_m
    run_starts = padded_ends - padded
    run_starts[num_experts] = capacity  # ... and go to one slot past the end, dropped
    slots = torch.where(experts < num_experts, run_starts[experts] + rank_in_run, capacity)
    pairs = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=flat.device)
    pairs[slots] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    ends = padded_ends[:num_experts]
    block_experts = torch.searchsorted(ends, block_starts, right=True)
    block_experts = block_experts.clamp(max=num_experts - 1).to(torch.int32)
    return AlignedPairs(pairs[:capacity], block_experts, ends[-1:].to(torch.int32))


ExpertWeight = torch.Tensor | BlockFp8


def fused_moe(
    x: torch.Tensor,
    w_gate_up: ExpertWeight,
    w_down: ExpertWeight,
    weights: torch.Tensor,
    ids: torch.Tensor,
    blocks: MoEBlocks | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    skips: bool = False,
) -> torch.Tensor:
    """Σ_k weights[t, k] * expert_{ids[t, k]}(x[t]), expert(v) = down(silu(gate(v)) * up(v)),
    for x [T, H], `w_gate_up` [E, 2I, H] and `w_down` [E, H, I] (tensors, or both `BlockFp8`):
    `RoutedExperts.combine_local`. With `skips`, an id of E means no expert (adds nothing)."""
    out = torch.empty_like(x)
    top_k = ids.shape[1]
    for lo in range(0, len(x), chunk_tokens):
        hi = min(lo + chunk_tokens, len(x))
        chunk = ids[lo:hi], weights[lo:hi]
        per_pair = _run_experts(x[lo:hi], w_gate_up, w_down, *chunk, blocks, zeroed=skips)
        out[lo:hi] = per_pair.view(hi - lo, top_k, -1).sum(dim=1)
    return out


def fused_expert_rows(
    x: torch.Tensor,
    w_gate_up: ExpertWeight,
    w_down: ExpertWeight,
    expert_ids: torch.Tensor,
    blocks: MoEBlocks | None = None,
) -> torch.Tensor:
    """Row i through expert expert_ids[i], unweighted: `RoutedExperts.compute` (the expert
    parallel path, where ids are this rank's local experts)."""
    return _run_experts(x, w_gate_up, w_down, expert_ids[:, None], None, blocks)


def _run_experts(
    x: torch.Tensor,
    w_gate_up: ExpertWeight,
    w_down: ExpertWeight,
    ids: torch.Tensor,
    weights: torch.Tensor | None,
    blocks: MoEBlocks | None,
    zeroed: bool = False,
) -> torch.Tensor:
    """Every pair's expert output [T * top_k, H] (times its routing weight when given); pairs
    of no expert (id E) stay unwritten: zeros with `zeroed`."""
    num_pairs, hidden = ids.numel(), x.shape[1]
    if num_pairs == 0:
        return x.new_zeros(0, hidden)
    _check_shapes(hidden, w_gate_up, w_down)
    scale_block = _scale_block(w_gate_up, w_down)
    blocks = blocks or pick_blocks(num_pairs, w_gate_up.shape[0], scale_block)
    if scale_block is not None and scale_block[1] % blocks.k:
        raise ValueError(
            f"BLOCK_K {blocks.k} must divide the FP8 scale block {scale_block[1]} "
            "(each K step reads one scale column)"
        )
    aligned = align_pairs(ids, w_gate_up.shape[0], blocks.m)
    x = x.contiguous()
    act = x.new_empty(num_pairs, w_down.shape[2])
    _launch(_gate_up_kernel, x, w_gate_up, act, aligned, blocks, TOP_K=ids.shape[1])
    per_pair = x.new_zeros(num_pairs, hidden) if zeroed else x.new_empty(num_pairs, hidden)
    routing = act if weights is None else weights.flatten().float().contiguous()  # act: unread
    _launch(
        _down_kernel,
        act,
        w_down,
        per_pair,
        aligned,
        blocks,
        weights_ptr=routing,
        MUL_WEIGHT=weights is not None,
    )
    return per_pair


def _check_shapes(hidden: int, w_gate_up: ExpertWeight, w_down: ExpertWeight) -> None:
    experts, rows, cols = w_gate_up.shape
    if cols != hidden or rows % 2 or tuple(w_down.shape) != (experts, hidden, rows // 2):
        raise ValueError(
            f"fused_moe takes x [T, H], gate_up [E, 2I, H] and down [E, H, I]; got H={hidden}, "
            f"gate_up {tuple(w_gate_up.shape)}, down {tuple(w_down.shape)}"
        )


def _scale_block(w_gate_up: ExpertWeight, w_down: ExpertWeight) -> tuple[int, int] | None:
    if isinstance(w_gate_up, BlockFp8) != isinstance(w_down, BlockFp8):
        raise TypeError("fused_moe takes both projections as BlockFp8 or neither")
    if isinstance(w_gate_up, BlockFp8):
        if w_gate_up.block != w_down.block or w_gate_up.halves != 2:
            raise ValueError(
                "fused_moe's FP8 gate_up must have gate and up halves (halves=2) and the same "
                f"block as down: got {w_gate_up.block} x{w_gate_up.halves} and {w_down.block}"
            )
        return w_gate_up.block
    return None


def _launch(
    kernel: triton.JITFunction,
    a: torch.Tensor,
    w: ExpertWeight,
    out: torch.Tensor,
    aligned: AlignedPairs,
    blocks: MoEBlocks,
    **specific: object,
) -> None:
    """One grouped GEMM: a row block of sorted pairs x a column block of `out` per program."""
    scaled = isinstance(w, BlockFp8)
    weight, scale = (w.weight, w.scale) if scaled else (w, w)  # unscaled: scale is never read
    scale_block = w.block if scaled else (1, 1)
    grid = (len(aligned.block_experts), triton.cdiv(out.shape[1], blocks.n))
    kernel[grid](
        a,
        weight,
        scale,
        out,
        aligned.pairs,
        aligned.block_experts,
        aligned.num_padded,
        out.shape[0],
        a.shape[1],
        out.shape[1],
        a.stride(0),
        *weight.stride(),
        *(scale.stride() if scaled else (0, 0, 0)),
        out.stride(0),
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_K=blocks.k,
        SCALE_N=scale_block[0],
        SCALE_K=scale_block[1],
        HAS_SCALE=scaled,
        UPCAST=upcast_dots(a.dtype),
        PRECISION=dot_precision(a.dtype),
        **specific,
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def _scaled_dot(
    a,
    w,
    scale_ptrs,
    cols_ok,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """a [M, K] @ w [K, N] in float32; an FP8 w takes a's dtype (exact: e4m3 fits in bf16) and
    the product its tiles' scales, one per column."""
    part = dot(a, w.to(a.dtype), PRECISION, UPCAST)
    if HAS_SCALE:
        part = part * tl.load(scale_ptrs, mask=cols_ok, other=0.0)[None, :]
    return part


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    act_ptr,
    pairs_ptr,
    block_experts_ptr,
    num_padded_ptr,
    num_pairs,
    hidden,
    inter,
    stride_x,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    stride_act,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """act[p, n] = silu(x[p // TOP_K] . gate[e, n]) * (x[p // TOP_K] . up[e, n]) for the
    BLOCK_M sorted pairs p of one expert e and BLOCK_N columns n of the intermediate size."""
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pairs_ok = pairs < num_pairs
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (pairs // TOP_K)[:, None] * stride_x + ks[None, :]
    gate_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    up_ptrs = gate_ptrs + inter * stride_wn
    # gate's scale rows, then up's (BlockFp8: each half's row blocks on their own)
    gate_scales = scale_ptr + expert * stride_se + (cols // SCALE_N) * stride_sn
    up_scales = gate_scales + tl.cdiv(inter, SCALE_N) * stride_sn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks_ok = k0 + ks < hidden
        x = tl.load(x_ptrs + k0, mask=pairs_ok[:, None] & ks_ok[None, :], other=0.0)
        w_ok = ks_ok[:, None] & cols_ok[None, :]
        g = tl.load(gate_ptrs + k0 * stride_wk, mask=w_ok, other=0.0)
        u = tl.load(up_ptrs + k0 * stride_wk, mask=w_ok, other=0.0)
        k_scale = (k0 // SCALE_K) * stride_sk
        gate += _scaled_dot(x, g, gate_scales + k_scale, cols_ok, HAS_SCALE, UPCAST, PRECISION)
        up += _scaled_dot(x, u, up_scales + k_scale, cols_ok, HAS_SCALE, UPCAST, PRECISION)
    act = gate * tl.sigmoid(gate) * up
    act_ptrs = act_ptr + pairs[:, None] * stride_act + cols[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=pairs_ok[:, None] & cols_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    pairs_ptr,
    block_experts_ptr,
    num_padded_ptr,
    num_pairs,
    inter,
    hidden,
    stride_act,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    stride_out,
    weights_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
):
    """out[p, n] = weight[p] * (act[p] . down[e, n]) for the BLOCK_M sorted pairs p of one
    expert e and BLOCK_N hidden columns n."""
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pairs_ok = pairs < num_pairs
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    act_ptrs = act_ptr + pairs[:, None] * stride_act + ks[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    scales = scale_ptr + expert * stride_se + (cols // SCALE_N) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks_ok = k0 + ks < inter
        a = tl.load(act_ptrs + k0, mask=pairs_ok[:, None] & ks_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0 * stride_wk, mask=ks_ok[:, None] & cols_ok[None, :], other=0.0)
        k_scale = (k0 // SCALE_K) * stride_sk
        acc += _scaled_dot(a, w, scales + k_scale, cols_ok, HAS_SCALE, UPCAST, PRECISION)
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pairs, mask=pairs_ok, other=0.0)[:, None]
    out_ptrs = out_ptr + pairs[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pairs_ok[:, None] & cols_ok[None, :])
