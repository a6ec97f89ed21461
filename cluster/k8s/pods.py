"""What every pod of a rendered cluster shares: the container, its probes, volumes and
resources, the stop sequence, the scrape annotations.

The stop sequence: the kubelet runs the preStop hook (a short sleep), then sends SIGTERM, which
drains a node (node/drain.py) or the gateway, then SIGKILL once terminationGracePeriodSeconds have
passed since the start; the grace covers the sleep, the drain and its tail.
"""

from __future__ import annotations

import math
from typing import Any

from node.drain import CUT_WAIT_S, SETTLE_S

from ..modelcache import CACHE_ENV
from ..spec import ClusterConfig
from .names import CONFIG_DIR, CONFIG_MAP, CONFIG_PATH, HTTP
from .settings import K8sSettings

MODEL_CACHE = "/var/cache/pdserve"  # model.make checkpoints, generated in each pod
EXIT_MARGIN_S = 10  # past the drain: uvicorn's close, the scheduler process's stop
PROBE_PERIOD_S = 10


def container(
    cluster: ClusterConfig, role: str, args: list[str], ports: list[Any], **parts: Any
) -> dict[str, Any]:
    """The `pdserve ROLE --config ... --name ...` container; `parts`: resources, mounts, probes."""
    k8s = cluster.k8s
    spec: dict[str, Any] = {
        "name": role,
        "image": k8s.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "command": ["pdserve"],
        "args": args,
        "ports": ports,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *model_env(cluster)],
        **parts,
    }
    if not ports:
        del spec["ports"]
    if k8s.pre_stop_s:
        spec["lifecycle"] = pre_stop(k8s)
    return spec


def component_args(role: str, name: str) -> list[str]:
    """What `pdserve launch` runs for component `name` (cluster/launch.py), on the mounted config."""
    return [role, "--config", CONFIG_PATH, "--name", name]


def pre_stop(k8s: K8sSettings) -> dict[str, Any]:
    # NOTE: SIGTERM alone drains (a node refuses new work with 503 and finishes what it holds;
    # the gateway stops accepting). The sleep before it lets the endpoints, kube-proxy and load
    # balancers drop the pod first, so no new connection reaches a listener that is closing.
    return {"preStop": {"exec": {"command": ["sleep", str(k8s.pre_stop_s)]}}}


def node_grace_s(drain_timeout_s: float, k8s: K8sSettings) -> int:
    """A node's terminationGracePeriodSeconds: the preStop sleep, then its drain, then what a
    drain does past its timeout (cut what is left, let the scheduler settle), then its exit."""
    tail = CUT_WAIT_S + SETTLE_S + EXIT_MARGIN_S
    return math.ceil(k8s.pre_stop_s + drain_timeout_s + tail)


def gateway_grace_s(cluster: ClusterConfig) -> int:
    return math.ceil(cluster.k8s.pre_stop_s + cluster.gateway.drain_timeout_s + EXIT_MARGIN_S)


def http_probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": HTTP},
        "periodSeconds": period_s,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def node_probes(grace_s: int, k8s: K8sSettings, check: Any = None) -> dict[str, Any]:
    """Readiness and liveness on /health (503 while the node loads or drains) and a startup
    probe as long as the weights may take to load; `check` replaces the HTTP check."""
    # NOTE: liveness outlasts a drain (a draining node answers 503 until it exits), so it never
    # kills a node that is finishing its requests
    liveness = max(6, math.ceil(grace_s / PROBE_PERIOD_S) + 1)
    startup = math.ceil(k8s.startup_timeout_s / PROBE_PERIOD_S)
    probes = {
        "readinessProbe": http_probe("/health", 5, 2),
        "livenessProbe": http_probe("/health", PROBE_PERIOD_S, liveness),
        "startupProbe": http_probe("/health", PROBE_PERIOD_S, startup),
    }
    if check is not None:
        for probe in probes.values():
            del probe["httpGet"]
            probe["exec"] = check
    return probes


def scrape_annotations(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
            "prometheus.io/port": str(port)}  # fmt: skip


def volumes(cluster: ClusterConfig, shm_mib: int = 0) -> tuple[list[Any], list[Any]]:
    """(pod volumes, container mounts): the config, the model, and /dev/shm where `shm_mib`."""
    vols: list[Any] = [{"name": "config", "configMap": {"name": CONFIG_MAP}}]
    mounts: list[Any] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    path, model = cluster.model.path, cluster.k8s.model_claim
    if path is None:
        vols.append({"name": "model-cache", "emptyDir": {}})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE})
    else:
        source = (
            {"persistentVolumeClaim": {"claimName": model, "readOnly": True}}
            if model
            else {"hostPath": {"path": path, "type": "Directory"}}
        )
        vols.append({"name": "model", **source})
        mounts.append({"name": "model", "mountPath": path, "readOnly": True})
    if shm_mib:
        # NOTE: NCCL, gloo and torch's shared tensors live in /dev/shm; a container's own is 64 MiB
        vols.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_mib}Mi"}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    return vols, mounts


def model_env(cluster: ClusterConfig) -> list[dict[str, str]]:
    """model.make: each pod generates the checkpoint (seeded: the same bytes everywhere)."""
    return [{"name": CACHE_ENV, "value": MODEL_CACHE}] if cluster.model.path is None else []


def pod_spec(containers: list[Any], vols: list[Any], grace_s: int, **extra: Any) -> dict[str, Any]:
    return {
        "containers": containers,
        "volumes": vols,
        "terminationGracePeriodSeconds": grace_s,
        "enableServiceLinks": False,  # no Service's address in the environment: pods use DNS
        **extra,
    }
