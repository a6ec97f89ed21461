"""Offline throughput on CUDA at several batch sizes and saturated (512 prompts, up to 256 at a
time, beside SGLang's published figure), and the decode step beside its memory roofline: a
decode step must read every weight and each request's KV once, so it cannot beat (weight bytes
+ KV bytes) / bandwidth, with the bandwidth measured here as a device-to-device copy. Used by
scripts/gpu_check.py; on its own:

    python scripts/gpu_roofline.py MODEL_DIR [--backend flashinfer]      # last line JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.llm import LLM
from engine.sampling import SamplingParams


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CPU work is done when it returns)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str = "cuda", gib: float = 1) -> float:
    """Bytes per second moved (read + write) by the best of five `gib` GiB device copies."""
    src = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def decode_steps(
    llm: LLM, prompts: list[list[int]], params: SamplingParams, device: str
) -> list[float]:
    """Seconds of each step once every request decodes (all have their first token)."""
    engine, started, times = llm.engine, set(), []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"roofline-{i}", prompt, params)
    while engine.has_work():
        all_decoding = len(started) == len(prompts)
        synchronize(device)
        t0 = time.perf_counter()
        outs = engine.step()
        synchronize(device)
        if all_decoding:
            times.append(time.perf_counter() - t0)
        started.update(o.rid for o in outs)
    return times


SATURATE = {"prompts": 512, "max_running": 256, "input_len": 256, "output_len": 256}
"""The saturating offline run: batches as big as the scheduler takes, where throughput (not one
step's time) is the measure; SGLang's published offline figure for the 8B class is 16,215
output tok/s (SGLANG_8B_TOK_S)."""
SGLANG_8B_TOK_S = 16_215


def offline_and_roofline(
    model: Path,
    backend: str,
    batches: Sequence[int],
    input_len: int,
    output_len: int,
    full: dict[str, int] = SATURATE,
    device: str = "cuda",
) -> dict[str, Any]:
    """The measures (last line of the script); `full` is the saturating run's shape, and
    `device` other than cuda (CPU, float32) checks the code on a tiny model. The engine is
    closed after, so the GPU is free for what runs next (the check's serving node)."""
    longest = max(input_len + output_len, full["input_len"] + full["output_len"])
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    with LLM(
        str(model), device=device, dtype=dtype, attention_backend=backend,
        max_running=full["max_running"], max_batch_tokens=8192, page_size=16,
        enable_prefix_cache=False, max_total_tokens=full["max_running"] * longest * 2,
    ) as llm:  # fmt: skip
        return measure(llm, batches, input_len, output_len, full, device, backend)


def measure(
    llm: LLM,
    batches: Sequence[int],
    input_len: int,
    output_len: int,
    full: dict[str, int],
    device: str,
    backend: str,
) -> dict[str, Any]:
    """Everything `offline_and_roofline` reports, measured on `llm`."""
    top = max(batches)
    vocab = llm.engine.model_cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, min(vocab, 100_000), (top, input_len), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    tok_s = {str(b): output_tok_s(llm, prompts[:b], params) for b in batches}
    steps = decode_steps(llm, prompts, params, device)
    model_bytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    context = input_len + output_len / 2  # the mean context over the decode steps
    kv_bytes = top * context * llm.engine.pool.layout.bytes_per_token
    bandwidth = copy_bandwidth(device, 1 if device.startswith("cuda") else 1 / 16)
    step_s, bound_s = statistics.median(steps), (model_bytes + kv_bytes) / bandwidth
    shape = (full["prompts"], full["input_len"])
    many = torch.randint(100, min(vocab, 100_000), shape, generator=gen).tolist()
    saturated = output_tok_s(
        llm, many, SamplingParams(temperature=0, max_tokens=full["output_len"], ignore_eos=True)
    )
    return {
        "backend": backend, "output_tok_s": tok_s, "decode_batch": top,
        "decode_step_ms": round(step_s * 1e3, 3), "roofline_ms": round(bound_s * 1e3, 3),
        "x_roofline": round(step_s / bound_s, 2), "weight_gb": round(model_bytes / 1e9, 2),
        "kv_gb_per_step": round(kv_bytes / 1e9, 3), "copy_gb_s": round(bandwidth / 1e9),
        "saturated": {**full, "output_tok_s": saturated,
                      "x_sglang_published": round(saturated / SGLANG_8B_TOK_S, 2)},
    }  # fmt: skip


def output_tok_s(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> int:
    """Output tokens per second of one `generate` over `prompts`."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return round(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("model")
    p.add_argument("--backend", default="triton")
    a = p.parse_args()
    print(json.dumps(offline_and_roofline(Path(a.model), a.backend, (1, 16, 64), 256, 64)))
