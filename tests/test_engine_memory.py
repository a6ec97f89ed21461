"""The engine's memory stays flat under ever-new batch shapes (issue 12's prefill-node leak).

A prefill node's steps come in token counts that rarely repeat, and every new matmul shape made
oneDNN (and ideep, torch's wrapper of it) compile and keep one more kernel, up to 1024 each:
about 1 GB of RSS on a tiny model before it stopped. `EngineOptions.onednn_cache` bounds them.
Each run is a fresh process, so the caches start empty and the limit applies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Prefills of distinct lengths, three rounds of them; RSS after each round, as JSON.
SCRIPT = """
import json, random, sys
from engine.engine import Engine
from engine.options import EngineOptions
from engine.sampling import SamplingParams

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

options = EngineOptions(dtype="float32", max_total_tokens=4096, enable_prefix_cache=False,
                        threads=1, onednn_cache=int(sys.argv[2]))
engine = Engine(sys.argv[1], options)
lengths = random.Random(0).sample(range(40, 1000), 3 * 60)
sizes = []
for start in range(0, len(lengths), 60):
    for i, n in enumerate(lengths[start:start + 60]):
        engine.add_request(f"r{start + i}", list(range(100, 100 + n)), SamplingParams(max_tokens=1))
        while engine.has_work():
            engine.step()
    sizes.append(rss_mb())
print(json.dumps(sizes))
"""


def rss_rounds(model: Path, onednn_cache: int) -> list[float]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), str(onednn_cache)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_rss_stays_flat_under_ever_new_prefill_shapes(make_tiny: Callable[..., Path]) -> None:
    model = make_tiny("llama")
    bounded = rss_rounds(model, 128)  # the default
    growth = bounded[2] - bounded[0]  # after 180 shapes against after 60 (the caches are full)
    unbounded = rss_rounds(model, 0)
    if unbounded[2] - unbounded[0] < 100:
        pytest.skip("this torch build keeps no per-shape kernels here: nothing to bound")
    assert growth < 40, f"RSS grew {growth:.0f} MB over 120 new prefill shapes: {bounded}"
