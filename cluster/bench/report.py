"""The summary table (SGLang's labels and sections) and the JSONL record (SGLang's field names)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .backends import RequestOutput
from .metrics import BenchmarkMetrics

WIDTH = 50
# SGLang's JSONL names for the totals, where ours differ
RENAMED = {
    "total_input": "total_input_tokens",
    "total_output": "total_output_tokens",
    "total_output_retokenized": "total_output_tokens_retokenized",
    "total_input_server": "total_input_tokens_server",
    "total_output_planned": "total_output_tokens_planned",
}
SECTIONS = (  # (title, metric, ((label, stat), ...))
    (
        "End-to-End Latency",
        "e2e_latency",
        (
            ("Mean E2E Latency", "mean"),
            ("Median E2E Latency", "median"),
            ("P90 E2E Latency", "p90"),
            ("P99 E2E Latency", "p99"),
        ),
    ),
    (
        "Time to First Token",
        "ttft",
        (("Mean TTFT", "mean"), ("Median TTFT", "median"), ("P99 TTFT", "p99")),
    ),
    (
        "Time per Output Token (excl. 1st token)",
        "tpot",
        (("Mean TPOT", "mean"), ("Median TPOT", "median"), ("P99 TPOT", "p99")),
    ),
    (
        "Inter-Token Latency",
        "itl",
        (
            ("Mean ITL", "mean"),
            ("Median ITL", "median"),
            ("P95 ITL", "p95"),
            ("P99 ITL", "p99"),
            ("Max ITL", "max"),
        ),
    ),
)


def row(label: str, value: Any) -> str:
    text = f"{value:<10.2f}" if isinstance(value, float) else f"{value!s:<10}"
    return f"{label:<40} {text}".rstrip()


def format_table(m: BenchmarkMetrics, header: Mapping[str, Any]) -> str:
    """The table SGLang prints; `header` gives the first rows (Backend:, Traffic request rate:)."""
    lines = [f"{' Serving Benchmark Result ':=^{WIDTH}}"]
    lines += [row(label, value) for label, value in header.items()]
    lines += [
        row("Successful requests:", m.completed),
        row("Failed requests:", m.failed),
        row("Benchmark duration (s):", m.duration),
        row("Total input tokens:", m.total_input),
        row(
            "Total input tokens (server):",
            "n/a" if m.total_input_server is None else m.total_input_server,
        ),
        row("Total generated tokens:", m.total_output),
        row("Total generated tokens (planned):", m.total_output_planned),
        row("Total generated tokens (retokenized):", m.total_output_retokenized),
        row("Request throughput (req/s):", m.request_throughput),
        row("Input token throughput (tok/s):", m.input_throughput),
        row("Output token throughput (tok/s):", m.output_throughput),
        row("Peak output token throughput (tok/s):", m.max_output_tokens_per_s),
        row("Peak concurrent requests:", m.max_concurrent_requests),
        row("Total token throughput (tok/s):", m.total_throughput),
        row("Concurrency:", m.concurrency),
    ]
    if m.request_goodput is not None and m.slo_attainment is not None:
        lines.append(row("Request goodput (req/s):", m.request_goodput))
        lines.append(row("SLO attainment (%):", 100.0 * m.slo_attainment))
    for title, name, stats in SECTIONS:
        lines.append(f"{title:-^{WIDTH}}")
        values = getattr(m, name)
        lines += [row(f"{label} (ms):", getattr(values, stat)) for label, stat in stats]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def result_record(arguments: Mapping[str, Any], m: BenchmarkMetrics) -> dict[str, Any]:
    """One JSONL line: the run's arguments, then its results under SGLang's field names."""
    results = {RENAMED.get(k, k): v for k, v in m.flat().items()}
    return {**arguments, "duration": m.duration, **results}


def result_details(
    outputs: Sequence[RequestOutput], output_lens: Sequence[int], requested: Sequence[int]
) -> dict[str, list[Any]]:
    """--output-details: per request, in dataset order. `requested_output_lens` beside the
    server's own counts (`reported_output_lens`, None where it sent none) shows an answer cut
    short without an error."""
    return {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": list(output_lens),
        "requested_output_lens": list(requested),
        "reported_output_lens": [o.output_len for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "itls": [list(o.itl) for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one line (SGLang's habit: one line per run, runs accumulate in one file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
