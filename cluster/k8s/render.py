"""`pdserve k8s`: read the config, check that it can run on Kubernetes, and write a kustomize
directory: `kustomization.yaml` and one file per object (`kind-name.yaml`).

Files that an earlier rendering wrote into the directory and this one does not (a node taken
out of the config) are removed; other files are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import parse_cluster, read_config, resolve_config_path
from ..overrides import apply_overrides, set_path
from ..schema import ConfigError, build
from ..spec import ClusterConfig
from .checks import check_renderable, nodes_of
from .gateway import gateway_objects
from .hosts import config_map, pod_config
from .nodes import node_objects
from .policies import pool_budgets, service_monitor
from .settings import K8sSettings

HEADER = "# Rendered by `pdserve k8s`"
KUSTOMIZATION = "kustomization.yaml"


class Dumper(yaml.SafeDumper):
    """YAML that writes a text of several lines (the ConfigMap's cluster.yaml) as a block, and
    an object used twice in full each time (no anchors: kubectl and readers alike)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


Dumper.add_representer(str, represent_str)


def render(
    config: str | None,
    overrides: Sequence[str],
    out: Path,
    flags: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the objects of config `config` into `out`; `flags`: k8s keys set by flags, over
    the config and `overrides`. Returns the files written."""
    path = resolve_config_path(config)
    data, cluster = load(path, overrides, flags or {})
    source = f"{HEADER} from {path.name}; edit that and render again.\n"
    return write_kustomization(objects(cluster, data, path.name), out, source)


def load(
    path: Path, overrides: Sequence[str], flags: dict[str, Any]
) -> tuple[dict[str, Any], ClusterConfig]:
    """(the pods' config data: overrides, flags and pod hosts applied; its checked ClusterConfig)."""
    try:
        data = apply_overrides(read_config(path), overrides)
        if not isinstance(data, dict):
            parse_cluster(data)  # says what a config must be
        for key, value in flags.items():
            set_path(data, ["k8s", key], value)
        pods = pod_config(data, build(K8sSettings, data.get("k8s") or {}, "k8s"))
        cluster = parse_cluster(pods)
        check_renderable(cluster)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return pods, cluster


def objects(cluster: ClusterConfig, pods: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """Every object of the cluster: the config, the nodes, the gateway, the pools' policies."""
    found = [config_map(pods, cluster, source)]
    for role, i, node in nodes_of(cluster):
        found += node_objects(cluster, role, i, node)
    return found + gateway_objects(cluster) + pool_budgets(cluster) + service_monitor(cluster)


def file_name(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_kustomization(found: list[dict[str, Any]], out: Path, header: str) -> list[Path]:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory (give a directory)")
    out.mkdir(parents=True, exist_ok=True)
    names = [file_name(obj) for obj in found]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": names,
    }
    remove_stale(out, {*names, KUSTOMIZATION})
    written = []
    for name, obj in [*zip(names, found), (KUSTOMIZATION, kustomization)]:
        target = out / name
        text = yaml.dump(obj, Dumper=Dumper, sort_keys=False)
        target.write_text(header + text, encoding="utf-8")
        written.append(target)
    return written


def remove_stale(out: Path, keep: set[str]) -> None:
    """Remove the files an earlier rendering wrote that this one does not."""
    for old in out.glob("*.yaml"):
        if old.name not in keep and old.read_text(encoding="utf-8").startswith(HEADER):
            old.unlink()
