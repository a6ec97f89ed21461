"""A run: warm up, then send every prompt on a Poisson schedule under a concurrency cap.

With --request-rate inf every request leaves at once; otherwise the gaps between sends are
exponential with mean 1/rate (a Poisson process), drawn from --seed so that two runs (and the
two clusters of --compare) see the same arrival times. --max-concurrency holds a request back
until fewer than that many are in flight, so the real rate can fall below the asked one.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np
from tqdm.auto import tqdm

from .backends import Endpoint, RequestOutput, send
from .datasets import DatasetRow

WARMUP_MAX_TOKENS = 32  # a warmup request asks for at most this many tokens, as SGLang's


class WarmupFailed(RuntimeError):
    """No warmup request succeeded: the server or the flags are wrong; nothing was measured."""


@dataclass(frozen=True)
class Schedule:
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 1


@dataclass(frozen=True)
class RunResult:
    outputs: tuple[RequestOutput, ...]
    duration: float  # seconds from the first send to the last response
    start: float  # perf_counter() at the first send


def arrival_offsets(n: int, request_rate: float, seed: int) -> np.ndarray:
    """Seconds after the start at which each of n requests is sent."""
    if request_rate <= 0:
        raise ValueError(f"--request-rate {request_rate}: give a positive rate (or inf)")
    if math.isinf(request_rate) or n == 0:
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=n)
    return np.concatenate(([0.0], np.cumsum(gaps[:-1])))


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=30.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,  # NOTE: no proxy between the benchmark and the server it measures
    )


async def warm_up(client: httpx.AsyncClient, endpoint: Endpoint, row: DatasetRow, n: int) -> None:
    if n <= 0:
        return
    sends = [send(client, endpoint, row, min(row.output_len, WARMUP_MAX_TOKENS)) for _ in range(n)]
    outputs = await asyncio.gather(*sends)
    if not any(o.success for o in outputs):
        raise WarmupFailed(
            f"all {n} warmup requests to {endpoint.url} failed: {outputs[0].error} "
            "(check --base-url/--host/--port, --backend and the request flags; "
            "--warmup-requests 0 runs and counts the failures instead)"
        )


async def run_benchmark(
    endpoint: Endpoint,
    rows: Sequence[DatasetRow],
    schedule: Schedule,
    warmup_requests: int = 1,
    disable_tqdm: bool = False,
) -> RunResult:
    if not rows:
        raise ValueError("the dataset has no prompts (raise --num-prompts or check the dataset)")
    offsets = arrival_offsets(len(rows), schedule.request_rate, schedule.seed).tolist()
    gate = asyncio.Semaphore(schedule.max_concurrency) if schedule.max_concurrency else None
    async with new_client() as client:
        await warm_up(client, endpoint, rows[0], warmup_requests)
        with tqdm(total=len(rows), disable=disable_tqdm) as bar:
            start = time.perf_counter()
            tasks = []
            for row, offset in zip(rows, offsets):
                await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
                tasks.append(asyncio.create_task(send_row(client, endpoint, row, gate, bar)))
            outputs = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
    return RunResult(tuple(outputs), duration, start)


async def send_row(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    row: DatasetRow,
    gate: asyncio.Semaphore | None,
    bar: tqdm,
) -> RequestOutput:
    if gate is None:
        out = await send(client, endpoint, row)
    else:
        async with gate:
            out = await send(client, endpoint, row)
    bar.update(1)
    return out
