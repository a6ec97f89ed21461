"""The numbers of a run, from the requests' timings alone (pure functions; tests pin them down).

Definitions, as SGLang's bench_serving makes them:

- output length: the server's count (`usage.completion_tokens`, native `meta_info`) when it
  sends one, else the generated text re-tokenized; failed requests count 0. Beside the planned
  input tokens (the dataset's) stand the server's (`usage.prompt_tokens`), and beside the
  generated tokens the planned ones.
- TPOT of a request = (latency - TTFT) / (output length - 1), for outputs of 2+ tokens.
- ITL: every inter-chunk gap of every request, pooled.
- Concurrency = sum of E2E latencies / duration (Little's law).
- Peak output token throughput: the most tokens that arrived within one 1-second bucket (buckets
  counted from the first request's start); peak concurrent requests: the most requests active
  within one bucket.
- Goodput (DistServe): requests that met both SLOs per second of the run; a request meets the
  TTFT SLO when its TTFT is within it, and the ITL SLO when the mean of its inter-token latencies
  is (DistServe's per-request decode latency); SLO attainment: their share of all requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .backends import RequestOutput

STATS = ("mean", "median", "std", "p90", "p95", "p99", "max")


@dataclass(frozen=True)
class Stats:
    """One latency distribution, in milliseconds (all 0.0 when there are no samples)."""

    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None  # None: no TTFT objective
    itl_ms: float | None = None

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.itl_ms is not None


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    duration: float
    total_input: int
    total_output: int
    total_output_retokenized: int
    total_input_server: int | None  # the server's usage.prompt_tokens; None: it sent none
    total_output_planned: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    output_throughput_retokenized: float
    total_throughput: float
    total_throughput_retokenized: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    concurrency: float
    e2e_latency: Stats
    ttft: Stats
    tpot: Stats
    itl: Stats
    request_goodput: float | None = None  # with an SLO only
    slo_attainment: float | None = None

    def flat(self) -> dict[str, float | int | None]:
        """SGLang's JSONL names: mean_ttft_ms, p99_itl_ms, median_e2e_latency_ms, ..."""
        scalars = {
            k: v for k, v in vars(self).items() if not isinstance(v, Stats) and k != "duration"
        }
        for name in ("e2e_latency", "ttft", "tpot", "itl"):
            stats: Stats = getattr(self, name)
            scalars.update({f"{stat}_{name}_ms": getattr(stats, stat) for stat in STATS})
        return scalars


def summarize(seconds: Sequence[float]) -> Stats:
    if not seconds:
        return Stats()
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p90, p95, p99 = (float(v) for v in np.percentile(ms, [90, 95, 99]))
    return Stats(
        float(ms.mean()), float(np.median(ms)), float(ms.std()), p90, p95, p99, float(ms.max())
    )


def output_len(out: RequestOutput, count_tokens: Callable[[str], int]) -> int:
    return out.output_len if out.output_len is not None else count_tokens(out.generated_text)


def server_inputs(ok: Sequence[RequestOutput]) -> int | None:
    """The prompt tokens the server counted, when it counted every successful request's."""
    counted = [o.server_prompt_len for o in ok]
    if not ok or any(n is None for n in counted):
        return None
    return sum(n for n in counted if n is not None)


def calculate_metrics(
    outputs: Sequence[RequestOutput],
    duration: float,
    count_tokens: Callable[[str], int],
    slo: Slo = Slo(),
) -> BenchmarkMetrics:
    ok = [o for o in outputs if o.success]
    lens = [output_len(o, count_tokens) for o in ok]
    retokenized = sum(count_tokens(o.generated_text) for o in ok)
    total_in, total_out = sum(o.prompt_len for o in ok), sum(lens)
    tpots = [(o.latency - o.ttft) / (n - 1) for o, n in zip(ok, lens) if n > 1]
    peak_tokens, peak_requests = peak_rates(ok)
    goodput, attainment = goodput_of(outputs, slo, duration) if slo.is_set else (None, None)
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(outputs) - len(ok),
        duration=duration,
        total_input=total_in,
        total_output=total_out,
        total_output_retokenized=retokenized,
        total_input_server=server_inputs(ok),
        total_output_planned=sum(o.planned_output_len for o in ok),
        request_throughput=len(ok) / duration,
        input_throughput=total_in / duration,
        output_throughput=total_out / duration,
        output_throughput_retokenized=retokenized / duration,
        total_throughput=(total_in + total_out) / duration,
        total_throughput_retokenized=(total_in + retokenized) / duration,
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_requests,
        concurrency=sum(o.latency for o in ok) / duration,
        e2e_latency=summarize([o.latency for o in ok]),
        ttft=summarize([o.ttft for o in ok]),
        tpot=summarize(tpots),
        itl=summarize([gap for o in ok for gap in o.itl]),
        request_goodput=goodput,
        slo_attainment=attainment,
    )


def token_times(out: RequestOutput) -> np.ndarray:
    """When each chunk of a response arrived (perf_counter seconds)."""
    gaps = np.asarray((out.ttft, *out.itl), dtype=np.float64)
    return out.start_time + np.cumsum(gaps)


def per_second(ok: Sequence[RequestOutput]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens that arrived, requests active) in each 1 s bucket from the first start."""
    if not ok:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    origin = min(o.start_time for o in ok)
    end = max(o.start_time + o.latency for o in ok)
    buckets = math.ceil(end - origin) + 1
    tokens, active = np.zeros(buckets), np.zeros(buckets, dtype=np.int64)
    for o in ok:
        seconds = (token_times(o) - origin).astype(np.int64)
        np.add.at(tokens, seconds[(seconds >= 0) & (seconds < buckets)], 1)
        active[int(o.start_time - origin) : int(o.start_time + o.latency - origin) + 1] += 1
    return tokens, active


def peak_rates(ok: Sequence[RequestOutput]) -> tuple[float, int]:
    """(most tokens in one 1 s bucket, most requests active in one bucket)."""
    tokens, active = per_second(ok)
    return (float(tokens.max()), int(active.max())) if len(tokens) else (0.0, 0)


def meets_slo(out: RequestOutput, slo: Slo) -> bool:
    if not out.success:
        return False
    ttft_ok = slo.ttft_ms is None or out.ttft * 1000.0 <= slo.ttft_ms
    mean_itl_ms = 1000.0 * sum(out.itl) / len(out.itl) if out.itl else 0.0
    return ttft_ok and (slo.itl_ms is None or mean_itl_ms <= slo.itl_ms)


def goodput_of(outputs: Sequence[RequestOutput], slo: Slo, duration: float) -> tuple[float, float]:
    """(requests meeting the SLO per second, their share of all requests)."""
    good = sum(meets_slo(o, slo) for o in outputs)
    return good / duration, (good / len(outputs) if outputs else 0.0)
