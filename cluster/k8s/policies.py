"""Objects about the pools rather than one component: a PodDisruptionBudget per node pool (a
voluntary eviction, such as a machine's drain, takes one node of a pool at a time) and the
ServiceMonitor that has the Prometheus operator scrape every component's /metrics."""

from __future__ import annotations

from typing import Any

from ..spec import ClusterConfig
from .names import APP, COMPONENT, HTTP, INSTANCE, metadata, pool_labels


def pool_budgets(cluster: ClusterConfig) -> list[dict[str, Any]]:
    pools = [role for role, nodes in (("prefill", cluster.prefill), ("decode", cluster.decode))
             if nodes]  # fmt: skip
    return [pool_budget(cluster, role) for role in pools]


def pool_budget(cluster: ClusterConfig, role: str) -> dict[str, Any]:
    spec = {"maxUnavailable": 1, "selector": {"matchLabels": pool_labels(role)}}
    meta = metadata(f"{APP}-{role}", cluster.k8s, pool_labels(role))
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta,
        "spec": spec,
    }


def service_monitor(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """Every Service of ours (the gateway's and each node's), scraped on its http port."""
    if not cluster.k8s.service_monitor:
        return []
    k8s = cluster.k8s
    spec = {
        "selector": {"matchLabels": {"app.kubernetes.io/name": APP}},
        "namespaceSelector": {"matchNames": [k8s.namespace]},
        "endpoints": [{"port": HTTP, "path": "/metrics", "interval": "15s"}],
        "targetLabels": [COMPONENT, INSTANCE],
    }
    meta = metadata(APP, k8s, {"app.kubernetes.io/name": APP})
    return [{"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta,
             "spec": spec}]  # fmt: skip
