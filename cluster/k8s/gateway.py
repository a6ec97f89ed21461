"""The gateway on Kubernetes: a Deployment behind a Service (type `k8s.gateway_service_type`).

It reads the node list from the mounted config (each node's DNS name) and checks each node's
/health itself; `/workers` adds and removes nodes at run time (gateway/admin.py).
"""

from __future__ import annotations

from typing import Any

from ..spec import GATEWAY, ClusterConfig
from .names import HTTP, labels, metadata
from .pods import (
    component_args,
    container,
    gateway_grace_s,
    http_probe,
    pod_spec,
    scrape_annotations,
    volumes,
)


def gateway_objects(cluster: ClusterConfig) -> list[dict[str, Any]]:
    return [gateway_deployment(cluster), gateway_service(cluster)]


def gateway_deployment(cluster: ClusterConfig) -> dict[str, Any]:
    k8s, port = cluster.k8s, cluster.gateway.port
    vols, mounts = volumes(cluster)
    main = container(
        cluster,
        GATEWAY,
        component_args(GATEWAY, GATEWAY),
        [{"name": HTTP, "containerPort": port}],
        resources={"requests": {"cpu": k8s.gateway_cpu, "memory": k8s.gateway_memory}},
        volumeMounts=mounts,
        **gateway_probes(),
    )
    template = {
        "metadata": {"labels": labels(GATEWAY, GATEWAY), "annotations": scrape_annotations(port)},
        "spec": pod_spec([main], vols, gateway_grace_s(cluster)),
    }
    spec = {
        "replicas": k8s.gateway_replicas,
        "selector": {"matchLabels": labels(GATEWAY, GATEWAY)},
        # a new gateway is ready before an old one stops: the Service never runs out
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        "template": template,
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": gateway_meta(cluster),
            "spec": spec}  # fmt: skip


def gateway_probes() -> dict[str, Any]:
    # NOTE: /health answers 503 while nothing can serve (no decode node; no prefill node either
    # unless gateway.prefill_fallback lets decode nodes prefill), which is the gateway's readiness
    # but not its liveness: restarting it would not bring a node back. Liveness asks /metrics,
    # which answers whenever the gateway's own event loop does.
    return {
        "readinessProbe": http_probe("/health", 5, 2),
        "livenessProbe": http_probe("/metrics", 10, 6),
        "startupProbe": http_probe("/metrics", 5, 60),
    }


def gateway_service(cluster: ClusterConfig) -> dict[str, Any]:
    port = cluster.gateway.port
    spec = {
        "type": cluster.k8s.gateway_service_type,
        "selector": labels(GATEWAY, GATEWAY),
        "ports": [{"name": HTTP, "port": port, "targetPort": HTTP}],
    }
    return {"apiVersion": "v1", "kind": "Service", "metadata": gateway_meta(cluster), "spec": spec}


def gateway_meta(cluster: ClusterConfig) -> dict[str, Any]:
    return metadata(GATEWAY, cluster.k8s, labels(GATEWAY, GATEWAY))
