"""How long a cluster takes to start: from `pdserve launch` to the gateway's first answer.

Each run starts `python -m cluster.cli launch [CONFIG] [--set ...]` from the current directory
(so a checkout of another commit measures that commit), waits until the gateway's /health says
ok and a 4-token completion comes back, then stops the cluster with SIGINT and waits for it to
exit. The gateway is at 127.0.0.1:--port (the config's `gateway.port`; 30000 in the embedded
one), the model is the first of its /v1/models. The last printed line is JSON (seconds per run,
and their median).

    python scripts/bench_start.py [CONFIG] [--runs 3] [--port 30000] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx

READY_TIMEOUT_S = 300.0


def first_answer(url: str, deadline: float) -> None:
    """Wait until the gateway at `url` answers a completion (ready, model known)."""
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                model = httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
                body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
                if httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200:
                    return
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no answer from {url} within {READY_TIMEOUT_S:.0f}s")


def one_run(argv: list[str], url: str) -> float:
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        first_answer(url, start + READY_TIMEOUT_S)
        return time.monotonic() - start
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="a cluster YAML (default: the embedded one)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=30000, help="the config's gateway.port")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    argv = [sys.executable, "-m", "cluster.cli", "launch"]
    argv += [args.config] if args.config else []
    for item in args.set:
        argv += ["--set", item]
    url = f"http://127.0.0.1:{args.port}"
    runs = []
    for i in range(args.runs):
        runs.append(one_run(argv, url))
        print(f"run {i + 1}: first answer after {runs[-1]:.1f} s", flush=True)
    result = {
        "config": args.config or "embedded",
        "runs_s": [round(r, 2) for r in runs],
        "median_s": round(statistics.median(runs), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
