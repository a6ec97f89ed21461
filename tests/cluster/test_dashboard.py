"""deploy/grafana/pdserve.json asks only for series the components export: the names come from
the node's and the gateway's own exposition code, rendered here, not from a list."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from api.settings import Instance
from gateway.breaker import CircuitBreaker
from gateway.metrics import GatewayMetrics
from gateway.workers import Worker
from node.metrics import GAUGES, NodeMetrics, TransferStats
from node.settings import NodeSettings

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve.json"
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
OPERATORS = {"and", "or", "unless", "bool", "offset"}


def exported_series() -> set[str]:
    """Every sample name the node and the gateway write on /metrics (the launcher exports
    none; a node reports its KV transfers and its start time)."""
    node = NodeMetrics()
    node.count("/generate", 200)
    node.observe_done(0.1, 0.5, [])
    # the scheduler reports each gauge of GAUGES, its transfers and start time in server_info
    info: dict[str, Any] = {key: 1 for key in GAUGES}
    info.update(transfer=TransferStats().info(), started=1.0)
    text = node.render(info, NodeSettings(role="decode", model="/m"))
    gateway = GatewayMetrics()
    gateway.record("/v1/completions", 200, 0.2)
    worker = Worker("decode", Instance("http://decode-0:30002"), CircuitBreaker(5, 10.0))
    text += gateway.render([worker], now=0.0)
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in samples}


def metric_names(expr: str) -> set[str]:
    """The series a PromQL expression selects (functions, labels and keywords aside)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    names = set(re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text))
    return names - OPERATORS


def queries() -> list[tuple[str, str]]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_the_query_reader_finds_series_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, role) (rate(a_bucket{status=~"5.."}[$__rate_interval])))'
        " / on (role) sum without (x) (b) - 1 - c_total offset 5m and bool d"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c_total", "d"}


@pytest.mark.parametrize(("title", "expr"), queries(), ids=lambda v: str(v)[:40])
def test_every_query_names_only_exported_series(title: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{title}: no series in {expr!r}"
    missing = names - exported_series()
    assert not missing, f"{title}: {sorted(missing)} are exported by no component"


def test_the_dashboard_covers_gateway_and_nodes() -> None:
    used = set().union(*(metric_names(expr) for _, expr in queries()))
    for series in (
        "pdserve_gateway_requests_total",
        "pdserve_gateway_time_to_first_token_seconds_bucket",
        "pdserve_gateway_request_duration_seconds_bucket",
        "pdserve_gateway_migrations_total",
        "pdserve_node_generation_tokens_total",
        "pdserve_node_running",
        "pdserve_node_waiting",
        "pdserve_node_free_pages",
        "pdserve_node_time_per_output_token_seconds_bucket",
        "pdserve_node_transfer_bytes_total",
        "pdserve_node_transfer_seconds_bucket",
        "pdserve_node_transfer_rooms_total",
        "pdserve_node_start_time_seconds",
    ):
        assert series in used, f"no panel shows {series}"
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
