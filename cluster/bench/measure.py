"""One measured run against a running server, shared by a single `pdserve bench` run and
`--compare`: the workload, the endpoint, the run and its table/JSONL record."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import datasets, probe
from .backends import BACKENDS, ROUTES, Endpoint
from .datasets import DatasetRow
from .flags import dataset_spec
from .metrics import BenchmarkMetrics, Slo, calculate_metrics, output_len
from .report import append_jsonl, format_table, result_details, result_record
from .runner import RunResult, Schedule, run_benchmark


@dataclass(frozen=True)
class Workload:
    """What every run of an invocation shares: the prompts and how to count tokens."""

    rows: tuple[DatasetRow, ...]
    count_tokens: Callable[[str], int]


@dataclass(frozen=True)
class Measured:
    metrics: BenchmarkMetrics
    result: RunResult
    record: dict[str, Any]


def load_workload(args: argparse.Namespace, tokenizer_dir: str) -> Workload:
    tokenizer = datasets.load_tokenizer(tokenizer_dir)
    spec = dataset_spec(args)
    if spec.tokenize_prompt and BACKENDS[args.backend] != "native":
        raise ValueError("--tokenize-prompt sends token ids: use it with --backend sglang")
    rows = tuple(datasets.sample(spec, tokenizer))
    print(f"#Input tokens: {sum(r.prompt_len for r in rows)}")
    print(f"#Output tokens: {sum(r.output_len for r in rows)}")
    return Workload(rows, lambda text: len(tokenizer.encode(text, add_special_tokens=False)))


def endpoint_for(args: argparse.Namespace, base_url: str, model: str) -> Endpoint:
    api = BACKENDS[args.backend]
    return Endpoint(
        api=api,
        url=base_url + ROUTES[api],
        model=model,
        stream=not args.disable_stream,
        ignore_eos=not args.disable_ignore_eos,
        extra_body=args.extra_request_body,
        headers=probe.auth_headers(),
    )


def measure(
    args: argparse.Namespace,
    endpoint: Endpoint,
    workload: Workload,
    request_rate: float,
    pd: Mapping[str, int] | None = None,
    labels: Mapping[str, Any] | None = None,
) -> Measured:
    """One run at `request_rate`: table printed, JSONL line appended when asked."""
    schedule = Schedule(request_rate, args.max_concurrency, args.seed)
    run = run_benchmark(endpoint, workload.rows, schedule, args.warmup_requests, args.disable_tqdm)
    result = asyncio.run(run)
    slo = Slo(args.slo_ttft_ms, args.slo_itl_ms)
    metrics = calculate_metrics(result.outputs, result.duration, workload.count_tokens, slo)
    print(format_table(metrics, table_header(args, request_rate, pd)), flush=True)
    record = result_record({**(labels or {}), **arguments(args, request_rate, pd)}, metrics)
    if args.output_details:
        lens = [output_len(o, workload.count_tokens) if o.success else 0 for o in result.outputs]
        requested = [row.output_len for row in workload.rows]
        record.update(result_details(result.outputs, lens, requested))
    if args.output_file:
        append_jsonl(args.output_file, record)
    return Measured(metrics, result, record)


def table_header(
    args: argparse.Namespace, request_rate: float, pd: Mapping[str, int] | None
) -> dict[str, Any]:
    header: dict[str, Any] = {
        "Backend:": args.backend,
        "Traffic request rate:": request_rate,
        "Max request concurrency:": args.max_concurrency or "not set",
    }
    if pd is not None:
        header["PD instances:"] = f"{pd['prefill']} prefill, {pd['decode']} decode"
    return header


def arguments(
    args: argparse.Namespace, request_rate: float, pd: Mapping[str, int] | None
) -> dict[str, Any]:
    """The run's arguments, as SGLang's JSONL opens (plus the PD shape and the SLOs)."""
    return {
        "backend": args.backend,
        "dataset_name": args.dataset_name,
        "request_rate": request_rate,
        "max_concurrency": args.max_concurrency,
        "sharegpt_output_len": args.sharegpt_output_len,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "num_prompts": args.num_prompts,
        "seed": args.seed,
        "pd_separated": args.pd_separated,
        "prefill_instances": pd["prefill"] if pd else None,
        "decode_instances": pd["decode"] if pd else None,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_itl_ms": args.slo_itl_ms,
    }
