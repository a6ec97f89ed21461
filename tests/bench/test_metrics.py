"""Metric math on fixed synthetic timings: every number is worked out by hand in the comments."""

from __future__ import annotations

import pytest

from cluster.bench.backends import Piece, RequestOutput, Timeline
from cluster.bench.datasets import DatasetRow
from cluster.bench.metrics import Slo, calculate_metrics, peak_rates
from cluster.bench.report import format_table, result_record

# A: 4 tokens (the server said so); TTFT 0.5 s; ITLs 0.1, 0.2, 0.3; E2E 1.1 s; starts at 100.0
# B: no server count, "xy" re-tokenizes to 2 tokens; TTFT 1.0; ITL 0.5; E2E 1.5; starts 100.5
# C: failed
A = RequestOutput(True, 10, "abcd", 4, 100.0, 1.1, 0.5, (0.1, 0.2, 0.3))
B = RequestOutput(True, 20, "xy", None, 100.5, 1.5, 1.0, (0.5,))
C = RequestOutput(False, 30, error="HTTP 400: no")
DURATION = 2.0


def count_chars(text: str) -> int:
    return len(text)  # a stand-in tokenizer: one token per character


def test_totals_and_throughputs() -> None:
    m = calculate_metrics([A, B, C], DURATION, count_chars)
    assert (m.completed, m.failed) == (2, 1)
    assert (m.total_input, m.total_output, m.total_output_retokenized) == (30, 6, 6)
    assert m.request_throughput == 1.0  # 2 requests / 2 s
    assert m.input_throughput == 15.0  # 30 / 2
    assert m.output_throughput == 3.0  # 6 / 2
    assert m.total_throughput == 18.0
    assert m.concurrency == pytest.approx(1.3)  # (1.1 + 1.5) / 2, Little's law


def test_latency_distributions() -> None:
    m = calculate_metrics([A, B, C], DURATION, count_chars)
    assert m.ttft.mean == pytest.approx(750.0)
    assert m.ttft.median == pytest.approx(750.0)
    assert m.ttft.p99 == pytest.approx(995.0)  # 500 + 0.99 * (1000 - 500)
    # TPOT: A (1.1 - 0.5) / (4 - 1) = 200 ms, B (1.5 - 1.0) / (2 - 1) = 500 ms
    assert (m.tpot.mean, m.tpot.median) == pytest.approx((350.0, 350.0))
    # ITL pooled: 100, 200, 300, 500 ms
    assert m.itl.mean == pytest.approx(275.0)
    assert m.itl.median == pytest.approx(250.0)
    assert m.itl.p90 == pytest.approx(440.0)  # rank 2.7: 300 + 0.7 * 200
    assert m.itl.p95 == pytest.approx(470.0)
    assert m.itl.p99 == pytest.approx(494.0)
    assert m.itl.max == pytest.approx(500.0)
    assert (m.e2e_latency.mean, m.e2e_latency.std) == pytest.approx((1300.0, 200.0))


def test_peak_output_throughput_and_concurrency() -> None:
    # tokens arrive at +0.5 +0.6 +0.8 +1.1 (A) and +1.5 +2.0 (B): seconds 0,0,0,1 and 1,2
    # A is active in seconds 0-1, B in 0-2
    assert peak_rates([A, B]) == (3.0, 2)
    m = calculate_metrics([A, B, C], DURATION, count_chars)
    assert (m.max_output_tokens_per_s, m.max_concurrent_requests) == (3.0, 2)


@pytest.mark.parametrize(
    ("slo", "goodput", "attainment"),
    [
        (Slo(ttft_ms=600, itl_ms=250), 0.5, 1 / 3),  # A only (B: TTFT 1000 ms)
        (Slo(itl_ms=250), 0.5, 1 / 3),  # A's mean ITL is 200 ms, B's 500 ms
        (Slo(ttft_ms=1000), 1.0, 2 / 3),  # A and B; C failed
        (Slo(ttft_ms=100), 0.0, 0.0),
    ],
)
def test_goodput(slo: Slo, goodput: float, attainment: float) -> None:
    m = calculate_metrics([A, B, C], DURATION, count_chars, slo)
    assert m.request_goodput == pytest.approx(goodput)
    assert m.slo_attainment == pytest.approx(attainment)


def test_no_success_gives_zeros_not_nans() -> None:
    m = calculate_metrics([C], DURATION, count_chars)
    assert (m.completed, m.failed, m.total_output) == (0, 1, 0)
    assert (m.ttft.mean, m.itl.p99, m.max_output_tokens_per_s) == (0.0, 0.0, 0.0)
    assert m.request_goodput is None
    assert "Failed requests:                         1" in format_table(m, {})


def test_native_chunks_spread_itl_over_their_tokens() -> None:
    t = Timeline(start=0.0)
    t.add(0.2, Piece("a", True, 1, 1))  # first token: TTFT 0.2
    t.add(0.5, Piece("bc", True, 3, 3))  # 2 tokens in 0.3 s: two ITLs of 0.15
    t.add(0.6, Piece("", True, 3, 3))  # no new token: ignored, the clock stays at 0.5
    t.add(0.9, Piece("d", True, 4, 4))  # 0.4 s after 0.5
    out = t.output(DatasetRow("p", 7, 4), end=1.0)
    assert out.ttft == 0.2
    assert out.itl == pytest.approx((0.15, 0.15, 0.4))
    assert (out.output_len, out.generated_text, out.latency) == (4, "abcd", 1.0)


def test_openai_chunks_without_text_do_not_count() -> None:
    t = Timeline(start=0.0)
    t.add(0.1, Piece("", False))  # e.g. the role-only first chat chunk
    t.add(0.3, Piece("x", True))
    t.add(0.4, Piece("y", True))
    t.add(0.5, Piece("", False, None, usage=2, prompt_tokens=9))  # the usage chunk (choices: [])
    out = t.output(DatasetRow("p", 8, 3), end=0.6)
    assert (out.ttft, out.output_len) == (0.3, 2)
    assert (out.prompt_len, out.server_prompt_len, out.planned_output_len) == (8, 9, 3)
    assert out.itl == pytest.approx((0.1,))


def test_jsonl_record_uses_sglang_names() -> None:
    m = calculate_metrics([A, B, C], DURATION, count_chars)
    record = result_record({"backend": "sglang"}, m)
    for key in ("total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "mean_ttft_ms", "median_itl_ms", "p99_itl_ms",
                "mean_tpot_ms", "median_e2e_latency_ms", "concurrency", "duration"):  # fmt: skip
        assert key in record, key
    assert record["median_itl_ms"] == pytest.approx(250.0)
