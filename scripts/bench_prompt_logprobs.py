"""What a prompt's logprobs cost: one request of a --input-len prompt, max_tokens 1, greedy,
timed with `prompt_logprobs` (every prompt position through the full-vocabulary LM head) and
without, on one engine, alternating, the prefix cache flushed before each; the best and the
median of --repeats each (the best is what a busy machine distorts least). With `--start S`
a third request asks only for the positions from S on (SGLang's logprob_start_len: scoring a
continuation after a context), its first S tokens cached by an untimed request beforehand.

    python scripts/bench_prompt_logprobs.py [--model DIR | --layers 24 --hidden 896 ...]

The default checkpoint is a tiny generated Llama; `--qwen-0.5b` makes a random one of
Qwen2-0.5B's shape (24 layers, hidden 896, 14/2 heads, MLP 4864, vocab 151936). The last
printed line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from engine.llm import LLM
from engine.sampling import SamplingParams
from modelgen.make import make_model

QWEN_05B = {"layers": 24, "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint dir (default: a generated one)")
    p.add_argument("--arch", default="llama")
    p.add_argument("--qwen-0.5b", dest="qwen", action="store_true", help="Qwen2-0.5B's shape")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--top", type=int, default=1, help="prompt_logprobs: best tokens per position")
    p.add_argument("--start", type=int, default=0, help="also time logprob_start_len S (cached)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk-size", type=int, default=2048)
    return p.parse_args()


def checkpoint(args: argparse.Namespace, tmp: Path) -> str:
    if args.model:
        return args.model
    shape = QWEN_05B if args.qwen else {
        "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
        "kv_heads": args.kv_heads, "intermediate": args.intermediate,
    }  # fmt: skip
    arch = "qwen2" if args.qwen else args.arch
    return str(make_model(arch, tmp / "model", tokenizer="qwen", **shape))


def timed(llm: LLM, prompt: list[int], params: SamplingParams) -> float:
    """One request's seconds, the cache flushed before (and, for a start S, the context's S
    tokens cached again by an untimed request)."""
    assert llm.engine.flush_cache()
    if params.prompt_logprobs_start:
        context = prompt[: params.prompt_logprobs_start + 1]
        llm.generate([context], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    elapsed = time.perf_counter() - start
    assert (out.prompt_logprobs is not None) == (params.prompt_logprobs is not None)
    return elapsed


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(args, Path(tmp))
        llm = LLM(path, dtype=args.dtype, chunk_size=args.chunk_size)
        vocab = llm.engine.model_cfg.vocab_size
        prompt = [(i * 7919 + 13) % vocab for i in range(args.input_len)]
        plain = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        asked = SamplingParams(
            temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=args.top
        )
        cases = {"without": plain, "with": asked}
        if args.start:
            cases["from start"] = replace(asked, prompt_logprobs_start=args.start)
        for params in cases.values():  # warm-up: kernels built, caches filled
            timed(llm, prompt, params)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, params in cases.items():
                times[name].append(timed(llm, prompt, params))
        llm.close()
    best = {k: min(v) * 1000 for k, v in times.items()}
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"model {path}, vocab {vocab}, prompt {args.input_len} tokens, top {args.top}")
    for name in times:
        print(f"  {name:>10} prompt logprobs: best {best[name]:8.1f} ms, "
              f"median {medians[name]:8.1f} ms (of {args.repeats})")  # fmt: skip
    print(f"  extra (best): {best['with'] - best['without']:.1f} ms "
          f"({best['with'] / best['without']:.2f}x)")  # fmt: skip
    print(json.dumps({"input_len": args.input_len, "start": args.start, "vocab": vocab,
                      "best_ms": best, "median_ms": medians}))  # fmt: skip


if __name__ == "__main__":
    main()
