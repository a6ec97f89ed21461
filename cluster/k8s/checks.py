"""What a cluster config needs before it can run on Kubernetes, beyond what it needs anywhere:
names that can name objects, ports apart within each pod, rank groups that span hosts only as
LeaderWorkerSets, a model path to mount."""

from __future__ import annotations

import re
from collections.abc import Iterator

from ..schema import ConfigError
from ..spec import ClusterConfig, DecodeSpec, PrefillSpec

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
# NOTE: a StatefulSet's pods carry `controller-revision-hash: NAME-<10 chars>`, a label value of
# at most 63 characters, so the name may have 52.
MAX_NAME = 52


def check_renderable(cluster: ClusterConfig) -> None:
    check_label("k8s.namespace", cluster.k8s.namespace, 63)
    for role, i, node in nodes_of(cluster):
        where = f"{role}.{i}"
        check_label(f"{where}.name", node.name, MAX_NAME)
        check_rank_group(where, node, cluster.k8s.multi_host)
        check_pod_ports(where, node)
    check_model(cluster)


def nodes_of(cluster: ClusterConfig) -> Iterator[tuple[str, int, PrefillSpec | DecodeSpec]]:
    """(role, index in the role's list, spec) of every node."""
    for role, nodes in (("prefill", cluster.prefill), ("decode", cluster.decode)):
        for i, node in enumerate(nodes):
            yield role, i, node


def check_label(where: str, value: str, limit: int) -> None:
    if len(value) > limit or not DNS_LABEL.match(value):
        raise ConfigError(
            f"{where}: {value!r} cannot name Kubernetes objects: use at most {limit} lowercase "
            "letters, digits and '-', starting and ending with a letter or digit"
        )


def check_rank_group(where: str, node: PrefillSpec | DecodeSpec, multi_host: bool) -> None:
    engine = node.engine
    if engine.node_rank != 0:
        raise ConfigError(
            f"{where}.engine.node_rank: each pod of a rank group gets its own node rank from the "
            f"rendering; leave it 0 (got {engine.node_rank})"
        )
    if engine.nnodes > 1 and not multi_host:
        raise ConfigError(
            f"{where}.engine.nnodes: {node.name!r} spans {engine.nnodes} hosts, which renders "
            "as a LeaderWorkerSet (one pod per host, the leader node_rank 0): ask for it with "
            "--lws (or --set k8s.multi_host=true) and install the LeaderWorkerSet controller"
        )


def check_pod_ports(where: str, node: PrefillSpec | DecodeSpec) -> None:
    """A pod is one network namespace: its listeners need ports of their own."""
    seen: dict[int, str] = {}
    for key, port in pod_ports(where, node):
        if port in seen:
            raise ConfigError(
                f"{key}: port {port} is also {seen[port]}, in the same pod {node.name!r} "
                "(give each listener of a node its own port)"
            )
        seen[port] = key


def pod_ports(where: str, node: PrefillSpec | DecodeSpec) -> list[tuple[str, int]]:
    """(config key under `where`, e.g. prefill.0, port) of every port node `node`'s (leader)
    pod listens on."""
    ports = [(f"{where}.port", node.port)]
    if isinstance(node, PrefillSpec):
        ports.append((f"{where}.bootstrap_port", node.bootstrap_port))
    if node.engine.nnodes > 1:
        ports.append((f"{where}.engine.dist_init_addr", rendezvous_port(where, node)))
    return ports


def rendezvous_port(where: str, node: PrefillSpec | DecodeSpec) -> int:
    """The port of a rank group's rendezvous (its dist_init_addr, host:port), which the leader
    pod listens on."""
    port = str(node.engine.dist_init_addr).rsplit(":", 1)[-1]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"{where}.engine.dist_init_addr: {node.engine.dist_init_addr!r} needs a port number "
            "(host:port; the renderer puts the leader pod's DNS name in place of the host)"
        )
    return int(port)


def check_model(cluster: ClusterConfig) -> None:
    path = cluster.model.path
    if path is not None and not path.startswith("/"):
        raise ConfigError(
            f"model.path: {path!r} is mounted into the pods at the same path, so it must be "
            "absolute (e.g. /models/Meta-Llama-3-8B-Instruct)"
        )
