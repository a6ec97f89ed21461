"""Offline throughput: pdserve's engine vs `transformers.generate` on the same checkpoint.

Workload (defaults): 64 prompts of 256 random tokens, 64 output tokens each (EOS ignored),
greedy, at most 16 sequences in flight for both (transformers runs batches of 16).
With `--json-schema` the engine runs the same prompts a second time, every request under a JSON
schema (xgrammar's token mask on every step), and reports what the grammar costs.
The last printed line is JSON.

    python scripts/bench_offline.py [--model DIR | --arch llama|deepseek_v3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from engine.llm import LLM
from engine.sampling import SamplingParams
from modelgen.archs import ARCHS
from modelgen.make import make_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint dir (default: a tiny generated one)")
    p.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks (processes)")
    p.add_argument("--ep-size", type=int, default=1, help="expert parallelism: 1 or --tp-size")
    p.add_argument(
        "--dp-attention", action="store_true", help="DP attention (MLA MoE; --ep-size = --tp-size)"
    )
    p.add_argument("--no-cpu-kernels", action="store_true", help="torch's ops only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention-backend", default="torch")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json-schema", action="store_true", help="also run every request under a JSON schema"
    )
    return p.parse_args()


# A record of many words: long enough that no request completes it within --output-len tokens,
# so every row stays constrained (and in the batch) for the whole run.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "words": {"type": "array", "items": {"type": "string"}, "minItems": 400},
    },
    "required": ["title", "words"],
    "additionalProperties": False,
}


def default_model(args: argparse.Namespace) -> Path:
    cache = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    shape = f"l{args.layers}-h{args.hidden}-a{args.heads}-kv{args.kv_heads}"
    out = cache / "models" / f"bench-{args.arch}-{shape}-{args.dtype}"
    if not (out / "config.json").is_file():
        make_model(
            args.arch,
            out,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.kv_heads,
            dtype=args.dtype,
        )
    return out


def make_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(args.seed)
    # stay clear of special tokens at the top of the vocabulary
    ids = torch.randint(100, min(vocab, 100_000), (args.num_prompts, args.input_len), generator=gen)
    return ids.tolist()


def bench_engine(
    model: Path, prompts: list[list[int]], args: argparse.Namespace
) -> tuple[list[float], int]:
    """([output tokens/s, and under the JSON schema when asked], KV cache bytes per token
    across all layers)."""
    llm = LLM(
        str(model),
        dtype=args.dtype,
        page_size=args.page_size,
        max_running=args.batch,
        max_batch_tokens=max(4096, args.input_len * 4),
        max_total_tokens=(args.input_len + args.output_len) * args.batch * 2,
        enable_prefix_cache=False,
        tp_size=args.tp_size,
        ep_size=args.ep_size,
        dp_attention=args.dp_attention,
        cpu_kernels=not args.no_cpu_kernels,
        device=args.device,
        attention_backend=args.attention_backend,
    )
    with llm:
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        rates = [timed(llm, prompts, params, args.output_len)]
        if args.json_schema:
            grammar = ("json_schema", json.dumps(SCHEMA))
            constrained = dataclasses.replace(params, grammar=grammar)
            llm.generate(prompts[:2], dataclasses.replace(constrained, max_tokens=4))
            rates.append(timed(llm, prompts, constrained, args.output_len))
    return rates, llm.engine.pool.layout.bytes_per_token


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams, output_len: int) -> float:
    """Output tokens/s of one run of every prompt."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == output_len for o in outs)
    return sum(len(o.token_ids) for o in outs) / elapsed


def bench_hf(model: Path, prompts: list[list[int]], args: argparse.Namespace) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype)).eval()
    kw = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len)
    with torch.inference_mode():
        warm = torch.tensor(prompts[:2])
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        produced = 0
        for i in range(0, len(prompts), args.batch):
            ids = torch.tensor(prompts[i : i + args.batch])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        elapsed = time.perf_counter() - start
    return produced / elapsed


def main() -> None:
    args = parse_args()
    model = Path(args.model) if args.model else default_model(args)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args, vocab)
    rates, kv_bytes = bench_engine(model, prompts, args)
    engine_tps = rates[0]
    print(f"pdserve engine: {engine_tps:.1f} output tok/s", flush=True)
    json_tps = rates[1] if len(rates) > 1 else None
    if json_tps is not None:
        print(f"pdserve engine, JSON schema: {json_tps:.1f} output tok/s", flush=True)
    hf_tps = None if args.skip_hf else bench_hf(model, prompts, args)
    if hf_tps is not None:
        print(f"transformers.generate: {hf_tps:.1f} output tok/s", flush=True)
    result = {
        "model": str(model),
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "batch": args.batch,
        "dtype": args.dtype,
        "tp_size": args.tp_size,
        "ep_size": args.ep_size,
        "dp_attention": args.dp_attention,
        "device": args.device,
        "attention_backend": args.attention_backend,
        "threads": torch.get_num_threads(),
        "engine_output_tok_s": round(engine_tps, 1),
        "kv_bytes_per_token": kv_bytes,
        "hf_output_tok_s": None if hf_tps is None else round(hf_tps, 1),
        "speedup": None if hf_tps is None else round(engine_tps / hf_tps, 2),
        "json_schema_output_tok_s": None if json_tps is None else round(json_tps, 1),
        "grammar_cost": None if json_tps is None else round(1 - json_tps / engine_tps, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
