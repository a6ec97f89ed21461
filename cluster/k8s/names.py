"""Names on Kubernetes: the labels every object carries, the stable DNS name of a node's pod,
and the ConfigMap and mount path every pod reads the cluster config from."""

from __future__ import annotations

from .settings import K8sSettings

APP = "pdserve"
CONFIG_MAP = "pdserve-cluster"
CONFIG_DIR = "/etc/pdserve"
CONFIG_FILE = "cluster.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
COMPONENT = "app.kubernetes.io/component"
INSTANCE = "pdserve.io/instance"
HTTP = "http"  # the port name the probes, Services and the ServiceMonitor use


def labels(role: str, name: str) -> dict[str, str]:
    """What every object of component `name` carries (and its pods are selected by)."""
    return {"app.kubernetes.io/name": APP, COMPONENT: role, INSTANCE: name}


def pool_labels(role: str) -> dict[str, str]:
    """Every pod of one role: a pool (prefill, decode, gateway)."""
    return {"app.kubernetes.io/name": APP, COMPONENT: role}


def pod_host(name: str, k8s: K8sSettings, pod: str | None = None) -> str:
    """The DNS name of pod `pod` (default: `name`-0, a StatefulSet's only pod, a
    LeaderWorkerSet's leader) under the headless Service `name`."""
    return f"{pod or f'{name}-0'}.{name}.{k8s.namespace}.svc.{k8s.cluster_domain}"


def metadata(name: str, k8s: K8sSettings, object_labels: dict[str, str]) -> dict[str, object]:
    return {"name": name, "namespace": k8s.namespace, "labels": dict(object_labels)}
