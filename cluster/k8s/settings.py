"""How `pdserve k8s` renders a cluster: the `k8s:` section of a cluster config.

`--image`, `--namespace` and `--lws` set three of its keys; `--set k8s.KEY=VALUE` any of them.
Components started from the config ignore the section, as they ignore `launch:`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from api.settings import setting

QUANTITY = re.compile(r"(\d+(\.\d+)?|\.\d+)([eE]\d+|[KMGTPE]i|[mkMGTPE])?\Z")  # 500m, 16Gi, 2
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def choice(default: str, help: str, choices: tuple[str, ...]) -> Any:
    """A field with its help text and its choices (checked, and listed in docs/CONFIG.md)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class K8sSettings:
    """The image, namespace, resources and probe budgets of the rendered objects."""

    image: str = setting("pdserve:latest", "the container image of every pod (`--image`)")
    image_pull_policy: str = choice("IfNotPresent", "when the kubelet pulls it", PULL_POLICIES)
    namespace: str = setting(
        "default", "the namespace of every object; node host names embed it (`--namespace`)"
    )
    cluster_domain: str = setting("cluster.local", "the cluster's DNS domain (`svc.<domain>`)")
    multi_host: bool = setting(
        False,
        "render a node whose rank group spans hosts (engine.nnodes > 1) as a LeaderWorkerSet "
        "(`--lws`; needs the LeaderWorkerSet controller); without it such a config is refused",
    )
    gateway_service_type: str = choice("ClusterIP", "the gateway Service's type", SERVICE_TYPES)
    gateway_replicas: int = setting(1, "gateway pods behind that Service")
    # NOTE: quantities are Any: `--set k8s.node_cpu=8` reads 8 as a number, as Kubernetes does
    node_cpu: Any = setting("4", "CPU request of a node pod (a Kubernetes quantity)")
    node_memory: Any = setting("16Gi", "memory request of a node pod")
    gateway_cpu: Any = setting("1", "CPU request of a gateway pod")
    gateway_memory: Any = setting("2Gi", "memory request of a gateway pod")
    shm_mib_per_rank: int = setting(
        2048, "/dev/shm of a node pod (memory-backed) per rank process it runs, in MiB"
    )
    rdma_resource: str = setting(
        "rdma/hca_shared_devices_a",
        "the device plugin's resource a node pod asks one of where transfer.protocol is rdma",
    )
    startup_timeout_s: int = setting(
        1800, "a node pod may load its weights this long before its liveness probe counts"
    )
    pre_stop_s: int = setting(
        5, "seconds a stopping pod keeps serving before SIGTERM, while endpoints drop it"
    )
    model_claim: str | None = setting(
        None,
        "model.path: a PersistentVolumeClaim holding the checkpoint, mounted at that path "
        "(default: the same path on each machine, as a hostPath)",
    )
    service_monitor: bool = setting(
        True, "render a ServiceMonitor (needs the Prometheus operator's CRDs)"
    )

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_quantities()
        for name in ("gateway_replicas", "shm_mib_per_rank", "startup_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pre_stop_s < 0:
            raise ValueError(f"pre_stop_s must be >= 0, got {self.pre_stop_s}")
        if not self.image:
            raise ValueError("image must name a container image, e.g. pdserve:latest")

    def _check_choices(self) -> None:
        for name, choices in (
            ("image_pull_policy", PULL_POLICIES),
            ("gateway_service_type", SERVICE_TYPES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} {getattr(self, name)!r} is not one of {', '.join(choices)}"
                )

    def _check_quantities(self) -> None:
        for name in ("node_cpu", "node_memory", "gateway_cpu", "gateway_memory"):
            value = getattr(self, name)
            if isinstance(value, bool) or not QUANTITY.match(str(value)):
                raise ValueError(
                    f"{name} {value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)"
                )
