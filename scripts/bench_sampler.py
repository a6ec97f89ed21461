"""The sampler's time per step, by batch mix, at a real vocabulary: what one decode step pays
after the LM head, whatever the model's size.

Mixes (B rows of random logits over --vocab):
- greedy: every row temperature 0;
- mixed: a quarter of the rows seeded top-k sampling (temperature 0.8, top_k 20), the rest
  greedy, as a server sees when a few clients sample;
- top_k: every row top-k sampling;
- top_p: every row nucleus sampling (top_p 0.9) over standard normal logits, a flat
  distribution (entropy about 11 nats) whose nucleus is most of the vocabulary: each row sorts;
- top_p_peaked: the same over logits 5x as wide (entropy about 3.7 nats, still flatter than a
  trained model's typical next token), whose nucleus lies among the best 1024 tokens.
The last printed line is JSON (milliseconds per step, the median of --steps).

    python scripts/bench_sampler.py [--batch 8 64] [--vocab 151936] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.sampler import Sampler
from engine.sampling import SamplerState, SamplingParams

GREEDY = SamplingParams(temperature=0, ignore_eos=True)


def mix(name: str, batch: int) -> list[SamplingParams]:
    def top_k(i: int) -> SamplingParams:
        return SamplingParams(temperature=0.8, top_k=20, seed=100 + i, ignore_eos=True)

    if name == "greedy":
        return [GREEDY] * batch
    if name == "mixed":
        return [top_k(i) if i % 4 == 3 else GREEDY for i in range(batch)]
    if name == "top_k":
        return [top_k(i) for i in range(batch)]
    return [SamplingParams(temperature=0.8, top_p=0.9, ignore_eos=True)] * batch


def step_ms(batch: int, vocab: int, name: str, steps: int) -> float:
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(batch))
    if name.endswith("_peaked"):
        logits *= 5
    params = mix(name.removesuffix("_peaked"), batch)
    states = [SamplerState.create(p, [1, 2, 3]) for p in params]
    sampler = Sampler(seed=0)
    sampler(logits, params, states)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sampler(logits, params, states)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    result: dict[str, float] = {}
    for batch in args.batch:
        for name in ("greedy", "mixed", "top_k", "top_p", "top_p_peaked"):
            ms = step_ms(batch, args.vocab, name, args.steps)
            result[f"b{batch}_{name}_ms"] = round(ms, 2)
            print(f"batch {batch:3d} {name:12s} {ms:8.2f} ms/step")
    print(json.dumps({"vocab": args.vocab, "threads": torch.get_num_threads(), **result}))


if __name__ == "__main__":
    main()
