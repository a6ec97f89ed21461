"""A whole decode step of a small Llama-family model in one native call (csrc/decode_layer.c).

At decode batch sizes a small model's layer is ~25 torch ops of a few microseconds each, so
dispatch, not arithmetic, is most of the step. `FusedLlamaDecode` runs every layer of a pure
decode step (each row one new token with cached context) through one C call on weights packed
once at load; embeddings, the rotary table and the final norm stay torch's. The runner uses it
only for Llama/Qwen2/Qwen3 on AVX-512 CPUs, with the torch attention backend, and only for
models small enough that the packed float32 copy of their layer weights is cheap (`MAX_BYTES`;
for bfloat16 weights, whose copy doubles the bytes a step reads, `BF16_MAX_BYTES`); larger
models are bound by their matmuls, where torch's GEMMs are the right tool anyway.

Arithmetic is float32 throughout. For a bfloat16 model that is wider than torch's path (which
rounds every activation to bfloat16): the weights are widened exactly, keys and values are
rounded to bfloat16 as the cache stores them, and the hidden state is rounded before the final
norm, so the step's tokens can differ from the torch path's only where bfloat16 rounding
decides a near-tie.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch

from engine.kernels.build import BUILD_ERRORS, bind, cpu_flags, float_kernels
from engine.kernels.lm_head import pack_weight

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 30  # packed layer weights kept beside the model's own
# NOTE: a bfloat16 model's packed float32 copy is twice the bytes torch's bfloat16 GEMMs read,
# so the fused step pays only while that copy stays near the last-level cache. Measured on this
# project's 2-core AMD EPYC (32 MiB L3), batch 16, decode step fused / torch: 12 MiB of float32
# layers 2.9 / 3.8 ms, 39 MiB 5.6 / 6.3, 48 MiB 7.9 / 7.4, 100 MiB 12.4 / 10.6, 605 MiB (12
# layers, hidden 1024) 53 / 38. A float32 model reads the same bytes either way (605 MiB: 62 /
# 98 ms), so MAX_BYTES alone bounds it.
BF16_MAX_BYTES = 40 << 20
_P = ctypes.c_void_p


class _Layer(ctypes.Structure):
    _fields_ = [
        (name, _P)
        for name in (
            "in_norm", "post_norm", "q_norm", "k_norm", "qkv_w", "qkv_b",
            "o_w", "gate_up_w", "down_w", "k_cache", "v_cache",
        )
    ]  # fmt: skip


class _Shape(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("hidden", "heads", "kv_heads", "head_dim", "inter")],
        ("page_size", ctypes.c_int64),
        ("bf16_cache", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class _Batch(ctypes.Structure):
    _fields_ = [
        ("rows", ctypes.c_int64),
        ("max_pages", ctypes.c_int64),
        *[(n, _P) for n in ("cos", "sin", "slots", "pages", "lens")],
    ]


def _packed(weight: torch.Tensor) -> torch.Tensor:
    return pack_weight(weight.detach().float())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedLlamaDecode:
    """Final hidden states [B, hidden] of a pure decode step (see the module docstring)."""

    def __init__(self, lib: ctypes.CDLL, model: Any, pool: Any, scale: float, threads: int):
        cfg = model.cfg
        self.model, self.threads = model, max(1, threads)
        args = [_P, ctypes.c_int64, _P, _P, _P, ctypes.c_int64]
        (self._fn,) = bind(lib, ("llama_decode_f32",), args)
        self.shape = _Shape(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, pool.page_size, int(pool.layout.dtype == torch.bfloat16),
            model.layers[0].input_layernorm.eps, scale,
        )  # fmt: skip
        self._keep: list[torch.Tensor] = []  # everything the C structs point into
        self.layers = (_Layer * len(model.layers))()
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            fields = {
                "in_norm": layer.input_layernorm.weight,
                "post_norm": layer.post_attention_layernorm.weight,
                "q_norm": None if attn.q_norm is None else attn.q_norm.weight,
                "k_norm": None if attn.k_norm is None else attn.k_norm.weight,
                "qkv_w": _packed(attn.qkv_proj.weight),
                "qkv_b": attn.qkv_proj.bias,
                "o_w": _packed(attn.o_proj.weight),
                "gate_up_w": _packed(mlp.gate_up_proj.weight),
                "down_w": _packed(mlp.down_proj.weight),
            }
            for name, tensor in fields.items():
                if tensor is not None:
                    tensor = tensor.detach().float().contiguous()
                    self._keep.append(tensor)
                setattr(self.layers[i], name, _ptr(tensor))
            self.layers[i].k_cache = pool.k_buffer(i).data_ptr()
            self.layers[i].v_cache = pool.v_buffer(i).data_ptr()

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        """`meta`: the torch backend's metadata of a step whose every row decodes."""
        embedded = self.model.embed_tokens(input_ids)
        x = embedded.float().contiguous()
        cos_sin = self.model.rotary.cos_sin(positions, torch.float32)
        cos, sin = (t[:, 0, :].contiguous() for t in cos_sin)
        pages, lens, slots = meta.decode_pages.contiguous(), meta.decode_lens, meta.write_slots
        batch = _Batch(x.shape[0], pages.shape[1], *map(_ptr, (cos, sin, slots, pages, lens)))
        args = (self.layers, len(self.layers), ctypes.byref(self.shape), ctypes.byref(batch))
        code = self._fn(*args, x.data_ptr(), self.threads)
        if code:
            raise RuntimeError(f"fused decode kernel failed (code {code})")
        return self.model.norm(x.to(embedded.dtype))


def fused_decode_unsupported(model: Any, pool: Any) -> str | None:
    """Why `FusedLlamaDecode` cannot serve this model, or None."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.family not in ("llama", "qwen2", "qwen3") or cfg.moe or cfg.mla:
        return "not a dense Llama-family model"
    weight = model.layers[0].self_attn.qkv_proj.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return f"weights are {weight.dtype} on {weight.device}: float32 or bfloat16 on CPU only"
    if pool.layout.dtype not in (torch.float32, torch.bfloat16):
        return f"the KV cache is {pool.layout.dtype}"
    if cfg.head_dim % 16 or cfg.head_dim > 256 or cfg.num_heads // cfg.num_kv_heads > 16:
        return f"head_dim {cfg.head_dim} / GQA group not served (multiples of 16, <= 256)"
    size = sum(p.numel() * 4 for p in model.layers.parameters())  # the float32 copies
    limit = MAX_BYTES if weight.dtype == torch.float32 else BF16_MAX_BYTES
    if size > limit:
        return (
            f"layer weights are {size >> 20} MiB as float32, above the {limit >> 20} MiB this "
            f"path copies for {str(weight.dtype).removeprefix('torch.')} weights"
        )
    if "avx512f" not in cpu_flags():
        return "this CPU lacks avx512f"
    return None


def build_fused_decode(model: Any, pool: Any, scale: float, threads: int):
    """The fused decode path for `model`, or None (reason logged)."""
    reason = fused_decode_unsupported(model, pool)
    if reason is None:
        try:
            return FusedLlamaDecode(float_kernels(), model, pool, scale, threads)
        except BUILD_ERRORS as exc:
            reason = str(exc)
    log.info("fused CPU decode off: %s", reason)
    return None
