"""Short real runs against a real colocated pdserve node: the table, the JSONL line, the counts,
the plot, each backend's stream, refused requests, and --compare through a stand-in launcher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cluster.cli import main as pdserve

HERE = Path(__file__).resolve().parent
LABELS = (
    "Backend:", "Traffic request rate:", "Max request concurrency:", "Successful requests:",
    "Benchmark duration (s):", "Total input tokens:", "Total input tokens (server):",
    "Total generated tokens:", "Total generated tokens (planned):",
    "Total generated tokens (retokenized):", "Request throughput (req/s):",
    "Input token throughput (tok/s):", "Output token throughput (tok/s):",
    "Peak output token throughput (tok/s):", "Peak concurrent requests:",
    "Total token throughput (tok/s):", "Concurrency:", "End-to-End Latency",
    "Mean E2E Latency (ms):", "Median E2E Latency (ms):", "Time to First Token",
    "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):",
    "Time per Output Token (excl. 1st token)", "Mean TPOT (ms):", "Median TPOT (ms):",
    "P99 TPOT (ms):", "Inter-Token Latency", "Mean ITL (ms):", "Median ITL (ms):",
    "P95 ITL (ms):", "P99 ITL (ms):", "Max ITL (ms):",
)  # fmt: skip
FIELDS = (
    "backend", "dataset_name", "request_rate", "max_concurrency", "random_input_len",
    "random_output_len", "random_range_ratio", "duration", "completed", "total_input_tokens",
    "total_input_tokens_server", "total_output_tokens_planned",
    "total_output_tokens", "total_output_tokens_retokenized", "request_throughput",
    "input_throughput", "output_throughput", "total_throughput", "max_output_tokens_per_s",
    "max_concurrent_requests", "concurrency", "mean_e2e_latency_ms", "median_e2e_latency_ms",
    "std_e2e_latency_ms", "p99_e2e_latency_ms", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms",
    "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "std_itl_ms", "p95_itl_ms", "p99_itl_ms", "max_itl_ms",
)  # fmt: skip


def workload(prompts: int, input_len: int, output_len: int) -> list[str]:
    return ["--dataset-name", "random", "--num-prompts", str(prompts), "--random-input-len",
            str(input_len), "--random-output-len", str(output_len), "--random-range-ratio", "1",
            "--disable-tqdm"]  # fmt: skip


def bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = pdserve(["bench", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_native_run_prints_the_table_and_writes_every_field(
    capsys: pytest.CaptureFixture[str], node_url: str, tmp_path: Path
) -> None:
    jsonl, png = tmp_path / "runs.jsonl", tmp_path / "run.png"
    code, out, err = bench(capsys, "--backend", "sglang", "--base-url", node_url,
                           *workload(8, 32, 8), "--request-rate", "20", "--output-file",
                           str(jsonl), "--output-details", "--plot", str(png))  # fmt: skip
    assert code == 0, err
    for label in LABELS:
        assert label in out, label
    record = json.loads(jsonl.read_text())
    assert set(FIELDS) <= set(record)
    assert (record["completed"], record["failed"]) == (8, 0)
    assert record["total_input_tokens"] == 8 * 32
    # the text prompts re-tokenize on the server into exactly the planned 32 tokens each
    assert record["total_input_tokens_server"] == 8 * 32
    assert record["total_output_tokens"] == record["total_output_tokens_planned"] == 8 * 8
    assert "Total input tokens (server):             256" in out
    assert record["output_lens"] == [8] * 8 and all(len(itl) == 7 for itl in record["itls"])
    assert record["mean_ttft_ms"] > 0 and record["mean_itl_ms"] > 0
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("backend", "flags"),
    [("sglang-oai", ()), ("vllm-chat", ()), ("sglang-oai", ("--disable-stream",))],
)
def test_openai_backends_and_whole_responses(
    capsys: pytest.CaptureFixture[str],
    node_url: str,
    tmp_path: Path,
    backend: str,
    flags: tuple[str, ...],
) -> None:
    jsonl = tmp_path / "runs.jsonl"
    code, out, err = bench(capsys, "--backend", backend, "--base-url", f"{node_url}/v1",
                           *workload(3, 16, 5), "--warmup-requests", "0", *flags,
                           "--max-concurrency", "2", "--output-file", str(jsonl))  # fmt: skip
    assert code == 0, err
    assert f"Backend:                                 {backend}" in out
    record = json.loads(jsonl.read_text())
    assert (record["completed"], record["total_output_tokens"]) == (3, 15)
    # at most 2 in flight at any moment: the summed latencies fit twice into the duration
    assert record["max_concurrency"] == 2 and record["concurrency"] <= 2.0 + 1e-9
    if flags:  # a whole response: its first token is its last, no inter-token gaps
        assert record["mean_itl_ms"] == 0.0
        assert record["mean_ttft_ms"] == pytest.approx(record["mean_e2e_latency_ms"], rel=0.05)


def test_a_refusing_node_counts_failures(
    capsys: pytest.CaptureFixture[str], node_url: str, tmp_path: Path
) -> None:
    jsonl = tmp_path / "runs.jsonl"
    # max_tokens 0: the node answers every request with a 400
    code, out, err = bench(capsys, "--backend", "vllm", "--base-url", node_url,
                           *workload(3, 8, 0), "--warmup-requests", "0", "--output-file",
                           str(jsonl), "--output-details")  # fmt: skip
    assert code == 1 and "all 3 requests failed" in err and "HTTP 400" in err
    assert "Failed requests:                         3" in out
    record = json.loads(jsonl.read_text())
    assert (record["completed"], record["failed"]) == (0, 3)
    assert all(e.startswith("HTTP 400: max_tokens") for e in record["errors"])


def test_pd_separated_needs_a_pd_gateway(capsys: pytest.CaptureFixture[str], node_url: str) -> None:
    code, _, err = bench(capsys, "--base-url", node_url, "--pd-separated", *workload(1, 8, 2))
    assert code == 1 and "reports no prefill instance" in err and "drop --pd-separated" in err


def test_compare_reports_goodput_per_cluster_and_rate(
    capsys: pytest.CaptureFixture[str], node_url: str, tmp_path: Path
) -> None:
    jsonl, png = tmp_path / "compare.jsonl", tmp_path / "compare.png"
    launch = f"{sys.executable} {HERE / 'fake_launch.py'} {node_url}"
    code, out, err = bench(capsys, "--compare", "one", "two --set x=1", "--compare-labels",
                           "A", "B", "--launch-command", launch, "--request-rates", "10,inf",
                           "--slo-ttft-ms", "60000", "--slo-itl-ms", "60000",
                           "--log-dir", str(tmp_path / "logs"), *workload(2, 8, 3),
                           "--warmup-requests", "0", "--output-file", str(jsonl),
                           "--plot", str(png))  # fmt: skip
    assert code == 0, err
    assert "goodput under TTFT <= 60000 ms and mean ITL <= 60000 ms" in out
    rows = [line for line in out.splitlines() if line.startswith(("| A |", "| B |"))]
    assert [r.split("|")[1:3] for r in rows] == [
        [" A ", " 10 "], [" A ", " inf "], [" B ", " 10 "], [" B ", " inf "]
    ]  # fmt: skip
    assert all("| 2/2 |" in r and "| 100% |" in r for r in rows)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["config"], r["request_rate"]) for r in records] == [
        ("A", 10.0), ("A", float("inf")), ("B", 10.0), ("B", float("inf"))
    ]  # fmt: skip
    assert all(r["slo_attainment"] == 1.0 for r in records)
    assert records[2]["launch"].endswith("two --set x=1")
    assert png.stat().st_size > 10_000
