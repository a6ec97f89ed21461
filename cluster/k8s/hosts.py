"""The cluster config as the pods read it, in a ConfigMap: the config as written (with `--set`
applied), each node's `host` its pod's stable DNS name, the gateway's `0.0.0.0`. Nothing else
changes, so every pod resolves its settings as `pdserve launch` would.

The hosts are placed before the config is checked, so what is checked is what the pods run:
nodes need no hosts of their own in the file, and two nodes may use the same ports.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from ..spec import ClusterConfig
from .names import APP, CONFIG_FILE, CONFIG_MAP, metadata, pod_host
from .settings import K8sSettings

ANY_ADDRESS = "0.0.0.0"  # the gateway listens on every address of its pod


def pod_config(data: dict[str, Any], k8s: K8sSettings) -> dict[str, Any]:
    """`data`, a cluster config's YAML data, with the hosts of the pods (entries that are not
    yet well formed are left for the config's own checks to name)."""
    data = copy.deepcopy(data)
    top = data.get("engine") if isinstance(data.get("engine"), dict) else {}
    for role in ("prefill", "decode"):
        entries = data.get(role)
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                place(entry, top, k8s)
    gateway = data.get("gateway")
    if gateway is None or isinstance(gateway, dict):
        data["gateway"] = {**(gateway or {}), "host": ANY_ADDRESS}
    return data


def place(entry: dict[str, Any], top_engine: dict[str, Any], k8s: K8sSettings) -> None:
    """Node `entry` on its pod; a rank group that spans pods meets at its leader, so its
    `dist_init_addr` keeps its port and takes the leader pod's name."""
    host = pod_host(entry["name"], k8s)
    entry["host"] = host
    engine = entry.get("engine")
    if not (engine is None or isinstance(engine, dict)):
        return
    merged = {**top_engine, **(engine or {})}
    addr = merged.get("dist_init_addr")
    if merged.get("nnodes", 1) != 1 and isinstance(addr, str) and ":" in addr:
        entry["engine"] = {**(engine or {}), "dist_init_addr": f"{host}:{addr.rsplit(':', 1)[1]}"}


def config_map(pods: dict[str, Any], cluster: ClusterConfig, source: str) -> dict[str, Any]:
    """The ConfigMap of `pods`, the config data `cluster` was parsed from."""
    header = (
        f"# {source}, rendered by `pdserve k8s` for namespace {cluster.k8s.namespace}: each "
        "node's host is its pod's DNS name.\n"
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(CONFIG_MAP, cluster.k8s, {"app.kubernetes.io/name": APP}),
        "data": {CONFIG_FILE: header + yaml.safe_dump(pods, sort_keys=False)},
    }
