"""`pdserve bench` / scripts/bench_serving.py: one run against a running server, or --compare."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import probe
from .compare import run_compare
from .flags import build_parser
from .measure import Measured, endpoint_for, load_workload, measure


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        if args.compare:
            return run_compare(args)
        return run_single(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1


def run_single(args: argparse.Namespace) -> int:
    base_url = probe.base_url_of(args)
    model, tokenizer_dir = probe.resolve_model(args, base_url)
    workload = load_workload(args, tokenizer_dir)
    pd = probe.pd_instances(base_url) if args.pd_separated else None
    measured = measure(args, endpoint_for(args, base_url, model), workload, args.request_rate, pd)
    if args.plot:
        from .plot import plot_run

        title = f"{args.backend} @ {args.request_rate} req/s, {len(workload.rows)} prompts"
        print(f"plot: {plot_run(measured.result.outputs, args.plot, title)}")
    return exit_code(measured)


def exit_code(measured: Measured) -> int:
    m = measured.metrics
    if m.completed:
        return 0
    first = next((o.error for o in measured.result.outputs if o.error), "")
    print(f"error: all {m.failed} requests failed; the first: {first}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
