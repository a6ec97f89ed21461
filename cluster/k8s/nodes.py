"""A prefill or decode node on Kubernetes: a StatefulSet of one pod under a headless Service of the
same name, so `NAME-0.NAME.NAMESPACE.svc` is its stable host; a rank group that spans hosts
(engine.nnodes > 1) is a LeaderWorkerSet whose leader (node rank 0) has that same name."""

from __future__ import annotations

from typing import Any

from node.settings import NodeSettings

from ..spec import ClusterConfig, DecodeSpec, PrefillSpec, ranks_here
from .checks import pod_ports
from .names import HTTP, labels, metadata, pod_host
from .pods import (
    component_args,
    container,
    node_grace_s,
    node_probes,
    pod_spec,
    scrape_annotations,
    volumes,
)

Node = PrefillSpec | DecodeSpec
GPU = "nvidia.com/gpu"
WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"  # LeaderWorkerSet's pod label
PORT_NAMES = {"port": HTTP, "bootstrap_port": "bootstrap", "engine.dist_init_addr": "rendezvous"}


def node_objects(cluster: ClusterConfig, role: str, i: int, node: Node) -> list[dict[str, Any]]:
    if node.engine.nnodes > 1:
        return [
            leader_worker_set(cluster, role, i, node),
            node_service(cluster, role, node, leader=True),
        ]
    sts = {
        "serviceName": node.name,
        "replicas": 1,
        "selector": {"matchLabels": labels(role, node.name)},
        "template": node_pod(cluster, role, i, node),
    }
    return [
        {"apiVersion": "apps/v1", "kind": "StatefulSet", **named(cluster, role, node), "spec": sts},
        node_service(cluster, role, node),
    ]


def named(cluster: ClusterConfig, role: str, node: Node, suffix: str = "") -> dict[str, Any]:
    return {"metadata": metadata(node.name + suffix, cluster.k8s, labels(role, node.name))}


def node_service(
    cluster: ClusterConfig, role: str, node: Node, leader: bool = False
) -> dict[str, Any]:
    """The headless Service that names the pod (a LeaderWorkerSet makes its own: this one,
    NAME-leader, then only selects the leader for monitoring)."""
    selector = labels(role, node.name) | ({WORKER_INDEX: "0"} if leader else {})
    ports = [
        {"name": name, "port": port, "targetPort": name}
        for name, port in named_ports(role, node)
        if name != "rendezvous"  # the group's own: its pods find the leader by name
    ]
    spec = {
        "clusterIP": "None",
        # NOTE: the pod's name resolves from its start, ready or not: the gateway checks each
        # node's /health itself, and a draining prefill's peers still reach its bootstrap server
        "publishNotReadyAddresses": True,
        "selector": selector,
        "ports": ports,
    }
    suffix = "-leader" if leader else ""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        **named(cluster, role, node, suffix),
        "spec": spec,
    }


def named_ports(role: str, node: Node) -> list[tuple[str, int]]:
    """(port name, port) of every port the node's (leader) pod listens on."""
    ports = pod_ports(role, node)
    return [(PORT_NAMES[key.removeprefix(f"{role}.")], port) for key, port in ports]


def node_pod(
    cluster: ClusterConfig, role: str, i: int, node: Node, worker: bool = False
) -> dict[str, Any]:
    """The pod template of node `node` (a LeaderWorkerSet's worker: `worker`)."""
    settings = cluster.node_settings(node.name)
    k8s = cluster.k8s
    grace = node_grace_s(settings.drain_timeout_s, k8s)
    vols, mounts = volumes(cluster, ranks_here(settings.engine) * k8s.shm_mib_per_rank)
    parts: dict[str, Any] = {"resources": node_resources(settings, cluster), "volumeMounts": mounts}
    if rdma(settings):  # RDMA pins (mlocks) the KV memory it registers
        parts["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    args = component_args(role, node.name)
    meta: dict[str, Any] = {"labels": labels(role, node.name)}
    if worker:
        args += worker_args(cluster, role, i, node)
        main = container(cluster, role, args, [], **parts, **worker_probes(cluster, node, grace))
        main["env"].append(worker_rank_env())
    else:
        ports = [{"name": n, "containerPort": p} for n, p in named_ports(role, node)]
        main = container(cluster, role, args, ports, **parts, **node_probes(grace, k8s))
        meta["annotations"] = scrape_annotations(node.port)
    return {"metadata": meta, "spec": pod_spec([main], vols, grace)}


def node_resources(settings: NodeSettings, cluster: ClusterConfig) -> dict[str, Any]:
    """CPU and memory requests; a GPU per rank on cuda, an RDMA device for rdma transfers."""
    k8s = cluster.k8s
    requests: dict[str, Any] = {"cpu": k8s.node_cpu, "memory": k8s.node_memory}
    devices: dict[str, Any] = {}
    if settings.engine.device.partition(":")[0] == "cuda":
        devices[GPU] = ranks_here(settings.engine)
    if rdma(settings):
        devices[k8s.rdma_resource] = 1
    if not devices:
        return {"requests": requests}
    return {"requests": requests | devices, "limits": devices}


def rdma(settings: NodeSettings) -> bool:
    return settings.transfer.protocol == "rdma" and settings.transfer.backend != "none"


def leader_worker_set(cluster: ClusterConfig, role: str, i: int, node: Node) -> dict[str, Any]:
    template = {
        "size": node.engine.nnodes,
        # NOTE: a rank group cannot lose a rank and go on: any pod's restart restarts them all
        "restartPolicy": "RecreateGroupOnPodRestart",
        "leaderTemplate": node_pod(cluster, role, i, node),
        "workerTemplate": node_pod(cluster, role, i, node, worker=True),
    }
    spec = {"replicas": 1, "startupPolicy": "LeaderCreated", "leaderWorkerTemplate": template}
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
            **named(cluster, role, node), "spec": spec}  # fmt: skip


def worker_args(cluster: ClusterConfig, role: str, i: int, node: Node) -> list[str]:
    """A worker pod runs its node rank's ranks (no API) and its transfer engines on its own host.

    Its name is `NAME-0-RANK` under the LeaderWorkerSet's headless Service `NAME`."""
    host = pod_host(node.name, cluster.k8s, pod=f"{node.name}-0-$(NODE_RANK)")
    return ["--node-rank", "$(NODE_RANK)", "--set", f"{role}.{i}.host={host}"]


def worker_rank_env() -> dict[str, Any]:
    label = f"metadata.labels['{WORKER_INDEX}']"
    return {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": label}}}


def worker_probes(cluster: ClusterConfig, node: Node, grace_s: int) -> dict[str, Any]:
    """A worker serves no HTTP: it is ready and alive while its group's leader is."""
    url = f"http://{pod_host(node.name, cluster.k8s)}:{node.port}/health"
    code = f"import urllib.request as r; r.urlopen({url!r}, timeout=4)"
    return node_probes(grace_s, cluster.k8s, {"command": ["python", "-c", code]})
