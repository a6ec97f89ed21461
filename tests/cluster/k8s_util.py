"""Rendering a config with `pdserve k8s` in-process and reading the objects back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main as pdserve


def render(out: Path, config: str | Path, *flags: str) -> list[dict[str, Any]]:
    """The objects `pdserve k8s CONFIG --out OUT FLAGS` writes, in kustomization order."""
    assert pdserve(["k8s", str(config), "--out", str(out), *flags]) == 0
    return read_objects(out)


def read_objects(out: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    return [yaml.safe_load((out / name).read_text()) for name in kustomization["resources"]]


def refusal(capsys: pytest.CaptureFixture[str], out: Path, config: str | Path, *flags: str) -> str:
    """The error of a rendering that must fail (exit 2), with nothing written."""
    assert pdserve(["k8s", str(config), "--out", str(out), *flags]) == 2
    assert not out.exists(), "a refused rendering wrote files"
    return capsys.readouterr().err


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def pod_templates(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The pod templates of a workload object (a LeaderWorkerSet has two)."""
    if obj["kind"] in ("StatefulSet", "Deployment"):
        yield obj["spec"]["template"]
    elif obj["kind"] == "LeaderWorkerSet":
        yield obj["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
        yield obj["spec"]["leaderWorkerTemplate"]["workerTemplate"]


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod template, container) of every container of every workload."""
    for obj in objects:
        for template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                yield template, container


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
