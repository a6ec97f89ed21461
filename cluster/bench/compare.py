"""--compare CONFIG_A CONFIG_B: launch each cluster in turn, run the same workload at each
--request-rates rate, and report goodput under the TTFT/ITL SLOs (DistServe's measure).

Each CONFIG is what `pdserve launch` takes, as one string: a config name or file and any
`--set` overrides, e.g. `local-cpu` (1 prefill + 1 decode) and `local-colocated` (the decode
node prefilling itself), or `'local-cpu --set gateway.port=31000'`. The launcher prints
`pdserve cluster ready: http://HOST:PORT/v1` once every component is healthy and stops them all
on SIGTERM; the clusters' logs go under --log-dir.
"""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import probe
from .launcher import PDSERVE_LAUNCH, ClusterSpec, launched
from .measure import Workload, endpoint_for, load_workload, measure
from .metrics import BenchmarkMetrics


@dataclass(frozen=True)
class Point:
    """One cluster at one request rate."""

    label: str
    request_rate: float
    metrics: BenchmarkMetrics


def run_compare(args: argparse.Namespace) -> int:
    if args.slo_ttft_ms is None and args.slo_itl_ms is None:
        raise ValueError("--compare reports goodput: give --slo-ttft-ms and/or --slo-itl-ms")
    command = tuple(shlex.split(args.launch_command)) if args.launch_command else PDSERVE_LAUNCH
    launches = [tuple(shlex.split(text)) for text in args.compare]
    labels = args.compare_labels or default_labels(launches)
    specs = [ClusterSpec(label, launch, command) for label, launch in zip(labels, launches)]
    points = run_clusters(args, specs)
    print(format_compare(points, args))
    if args.plot:
        from .plot import plot_compare

        print(f"plot: {plot_compare(points, args.plot, slo_text(args))}")
    return 0 if any(p.metrics.completed for p in points) else 1


def default_labels(launches: Sequence[tuple[str, ...]]) -> list[str]:
    """The config names (`configs/local-cpu.yaml` -> local-cpu); A and B when they are alike."""
    names = [Path(args[0]).stem if args else "local-cpu" for args in launches]
    return names if len(set(names)) == len(names) else ["A", "B"]


def run_clusters(args: argparse.Namespace, specs: Sequence[ClusterSpec]) -> list[Point]:
    """Each cluster in turn, at every rate, with the same prompts (drawn once, with --seed)."""
    points: list[Point] = []
    workload: Workload | None = None
    for spec in specs:
        with launched(spec, Path(args.log_dir), args.launch_timeout) as base_url:
            model, tokenizer_dir = probe.resolve_model(args, base_url)
            workload = workload or load_workload(args, tokenizer_dir)
            endpoint = endpoint_for(args, base_url, model)
            pd = probe.available_instances(base_url)
            labels = {"config": spec.label, "launch": spec.describe()}
            for rate in args.request_rates:
                print(f"\n[{spec.label}] request rate {rate} req/s", flush=True)
                measured = measure(args, endpoint, workload, rate, pd, labels)
                points.append(Point(spec.label, rate, measured.metrics))
    return points


def slo_text(args: argparse.Namespace) -> str:
    parts = [f"TTFT <= {args.slo_ttft_ms:g} ms"] if args.slo_ttft_ms is not None else []
    if args.slo_itl_ms is not None:
        parts.append(f"mean ITL <= {args.slo_itl_ms:g} ms")
    return "goodput under " + " and ".join(parts)


def format_compare(points: Sequence[Point], args: argparse.Namespace) -> str:
    """One markdown table: every cluster at every rate."""
    head = (
        "| config | rate (req/s) | completed | goodput (req/s) | SLO attainment | "
        "median TTFT (ms) | P99 TTFT (ms) | mean ITL (ms) | P99 ITL (ms) | output tok/s |"
    )
    lines = [f"\n{slo_text(args)}", "", head, "|---" * 10 + "|"]
    for p in points:
        m = p.metrics
        rate = "inf" if math.isinf(p.request_rate) else f"{p.request_rate:g}"
        lines.append(
            f"| {p.label} | {rate} | {m.completed}/{m.completed + m.failed} | "
            f"{m.request_goodput or 0.0:.2f} | {100 * (m.slo_attainment or 0.0):.0f}% | "
            f"{m.ttft.median:.0f} | {m.ttft.p99:.0f} | {m.itl.mean:.1f} | {m.itl.p99:.1f} | "
            f"{m.output_throughput:.1f} |"
        )
    return "\n".join(lines)
