"""Benchmark online serving with SGLang bench_serving's flags; the same as `pdserve bench`.

    python scripts/bench_serving.py --backend sglang --base-url http://127.0.0.1:30000 \
        --dataset-name random --random-input-len 256 --random-output-len 64 --num-prompts 64 \
        --request-rate 4 --output-file results.jsonl --plot run.png
    python scripts/bench_serving.py --compare local-cpu local-colocated \
        --request-rates 1,2,4 --slo-ttft-ms 1000 --slo-itl-ms 100 --plot goodput.png

The work is in cluster/bench/ (see its __init__ for a map).
"""

from __future__ import annotations

import sys

from cluster.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="bench_serving.py"))
