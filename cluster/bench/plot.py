"""--plot FILE.png: one run's latency distributions and its output tokens/s over time.

matplotlib is an optional dependency (`pip install 'pdserve[bench]'`), imported only here.
Figures are drawn without pyplot, so no global plotting state is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .backends import RequestOutput
from .metrics import per_second


def new_figure(rows: int, cols: int, title: str) -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'pdserve[bench]')"
        ) from None
    fig = Figure(figsize=(6 * cols, 4 * rows), layout="constrained")
    fig.suptitle(title)
    return fig, fig.subplots(rows, cols, squeeze=False)


def histogram(ax: Any, values_ms: Sequence[float], title: str) -> None:
    if values_ms:
        ax.hist(values_ms, bins=min(50, max(5, len(values_ms) // 4)), color="tab:blue")
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("count")


def plot_run(outputs: Sequence[RequestOutput], path: str | Path, title: str) -> Path:
    """TTFT, ITL and E2E latency histograms and output tokens/s over time, in one PNG."""
    ok = [o for o in outputs if o.success]
    fig, axes = new_figure(2, 2, title)
    histogram(axes[0][0], [o.ttft * 1000 for o in ok], "Time to first token")
    histogram(axes[0][1], [g * 1000 for o in ok for g in o.itl], "Inter-token latency")
    histogram(axes[1][0], [o.latency * 1000 for o in ok], "End-to-end latency")
    tokens, active = per_second(ok)
    ax = axes[1][1]
    ax.plot(range(len(tokens)), tokens, color="tab:green", label="output tokens/s")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Output token throughput over time")
    twin = ax.twinx()
    twin.step(range(len(active)), active, where="post", color="tab:gray", label="active requests")
    twin.set_ylabel("active requests")
    return save(fig, path)


def save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_compare(points: Sequence[Any], path: str | Path, title: str) -> Path:
    """Goodput, SLO attainment, P99 TTFT and mean ITL against request rate, a line per cluster.

    `points` are compare.Point: label, request_rate, metrics.
    """
    fig, axes = new_figure(2, 2, title)
    panels = (
        (axes[0][0], "goodput (req/s)", lambda m: m.request_goodput or 0.0),
        (axes[0][1], "SLO attainment (%)", lambda m: 100.0 * (m.slo_attainment or 0.0)),
        (axes[1][0], "P99 TTFT (ms)", lambda m: m.ttft.p99),
        (axes[1][1], "mean ITL (ms)", lambda m: m.itl.mean),
    )
    labels = list(dict.fromkeys(p.label for p in points))
    for ax, name, value in panels:
        for label in labels:
            mine = [p for p in points if p.label == label]
            ax.plot([p.request_rate for p in mine], [value(p.metrics) for p in mine], "o-",
                    label=label)  # fmt: skip
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(name)
        ax.legend()
    return save(fig, path)
