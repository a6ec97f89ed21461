"""`pdserve k8s` on every shipped config: the directory builds with kustomize, every object is
valid Kubernetes, every container is probed, Services carry the config's ports, and the pods'
cluster config is the config with DNS host names. No cluster is started."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cluster.config import CONFIGS_DIR, load_cluster
from cluster.k8s.names import CONFIG_FILE, CONFIG_MAP, CONFIG_PATH
from cluster.launch import component_argv
from cluster.spec import GATEWAY, ClusterConfig
from tests.cluster.k8s_util import containers, named, of_kind, pod_templates, read_objects, render

CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))
# NOTE: the oldest Kubernetes the objects are meant for (LeaderWorkerSet needs 1.26 or later;
# 1.29 is the oldest release of the schemas' set still in common use) and the newest schemas
UNCHECKED = {"LeaderWorkerSet", "ServiceMonitor"}  # custom resources: no schema offline
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda p: p.stem)
def rendered(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ClusterConfig, Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp(request.param.stem) / "k8s"
    return load_cluster(request.param), out, render(out, request.param)


def test_the_directory_holds_one_file_per_object(rendered: Any) -> None:
    _, out, objects = rendered
    listed = yaml.safe_load((out / "kustomization.yaml").read_text())["resources"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*listed, "kustomization.yaml"])
    assert [f"{o['kind'].lower()}-{o['metadata']['name']}.yaml" for o in objects] == listed
    assert {"ConfigMap", "Deployment", "Service", "StatefulSet", "PodDisruptionBudget"} <= {
        o["kind"] for o in objects
    }


def test_kubectl_kustomize_builds_it(rendered: Any) -> None:
    _, out, objects = rendered
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: the kustomize build is not checked here")
    built = subprocess.run(
        [kubectl, "kustomize", str(out)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    documents = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in documents) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in objects
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_passes_strict_validation(rendered: Any, version: str) -> None:
    _, _, objects = rendered
    for obj in objects:
        if obj["kind"] not in UNCHECKED:
            kubernetes_validate.validate(obj, version, strict=True)


def test_every_container_is_probed_and_stops_after_its_drain(rendered: Any) -> None:
    cluster, _, objects = rendered
    found = list(containers(objects))
    assert len(found) == len(cluster.component_names())
    for template, container in found:
        assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(container)
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
        name = template["metadata"]["labels"]["pdserve.io/instance"]
        drain = (
            cluster.gateway.drain_timeout_s
            if name == GATEWAY
            else cluster.node_settings(name).drain_timeout_s
        )
        assert template["spec"]["terminationGracePeriodSeconds"] > drain + 5


def test_service_ports_are_the_configs(rendered: Any) -> None:
    cluster, _, objects = rendered
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    assert set(services) == set(cluster.component_names())
    expected = {GATEWAY: {cluster.gateway.port}}
    expected |= {p.name: {p.port, p.bootstrap_port} for p in cluster.prefill}
    expected |= {d.name: {d.port} for d in cluster.decode}
    for name, service in services.items():
        assert {p["port"] for p in service["spec"]["ports"]} == expected[name], name
    for template, container in containers(objects):
        name = template["metadata"]["labels"]["pdserve.io/instance"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in services[name]["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"]


def test_nodes_are_statefulsets_under_headless_services_of_their_name(rendered: Any) -> None:
    cluster, _, objects = rendered
    for node in (*cluster.prefill, *cluster.decode):
        sts, service = (
            named(objects, "StatefulSet", node.name),
            named(objects, "Service", node.name),
        )
        assert sts["spec"]["serviceName"] == node.name and sts["spec"]["replicas"] == 1
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == sts["spec"]["template"]["metadata"]["labels"]
    gateway = named(objects, "Service", GATEWAY)
    assert gateway["spec"]["type"] == "ClusterIP"


def test_the_commands_are_what_launch_runs(rendered: Any) -> None:
    cluster, _, objects = rendered
    for template, container in containers(objects):
        name = template["metadata"]["labels"]["pdserve.io/instance"]
        launched = component_argv(cluster.role_of(name), Path(CONFIG_PATH), name, ())
        assert container["command"] == ["pdserve"]
        assert container["args"] == list(launched[3:])  # after `python -m cluster.cli`


def test_the_pods_config_is_the_config_with_dns_hosts(rendered: Any, tmp_path: Path) -> None:
    cluster, _, objects = rendered
    text = named(objects, "ConfigMap", CONFIG_MAP)["data"][CONFIG_FILE]
    (tmp_path / CONFIG_FILE).write_text(text)
    pods = load_cluster(tmp_path / CONFIG_FILE)
    hosts = {n.name: n.host for n in (*pods.prefill, *pods.decode)}
    assert hosts == {name: f"{name}-0.{name}.default.svc.cluster.local" for name in hosts}
    assert pods.gateway.host == "0.0.0.0"
    assert pods == with_hosts(cluster, hosts)  # and nothing else changed
    for template in (t for o in objects for t in pod_templates(o)):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == CONFIG_MAP


def with_hosts(cluster: ClusterConfig, hosts: dict[str, str]) -> ClusterConfig:
    def moved(nodes: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(dataclasses.replace(n, host=hosts[n.name]) for n in nodes)

    gateway = dataclasses.replace(cluster.gateway, host="0.0.0.0")
    return dataclasses.replace(
        cluster, prefill=moved(cluster.prefill), decode=moved(cluster.decode), gateway=gateway
    )


def test_devices_follow_the_engine_and_the_transfer(rendered: Any) -> None:
    cluster, _, objects = rendered
    for node in (*cluster.prefill, *cluster.decode):
        settings = cluster.node_settings(node.name)
        pod = named(objects, "StatefulSet", node.name)["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        limits = container["resources"].get("limits", {})
        gpus = settings.engine.tp_size if settings.engine.device == "cuda" else None
        assert limits.get("nvidia.com/gpu") == gpus
        rdma = settings.transfer.protocol == "rdma"
        assert limits.get("rdma/hca_shared_devices_a") == (1 if rdma else None)
        shm = {v["name"]: v for v in pod["spec"]["volumes"]}["shm"]["emptyDir"]
        assert shm == {"medium": "Memory", "sizeLimit": f"{2048 * settings.engine.tp_size}Mi"}
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(node.port)
    pools = {b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
             for b in of_kind(objects, "PodDisruptionBudget")}  # fmt: skip
    assert pools == {role for role in ("prefill", "decode") if getattr(cluster, role)}
    assert len(of_kind(objects, "ServiceMonitor")) == 1


def test_a_second_rendering_replaces_the_first(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    render(out, CONFIGS_DIR / "local-2p2d.yaml")
    (out / "notes.yaml").write_text("mine: true\n")
    render(out, CONFIGS_DIR / "local-cpu.yaml")
    names = {p.name for p in out.iterdir()}
    assert "statefulset-prefill-1.yaml" not in names and "notes.yaml" in names
    assert {o["metadata"]["name"] for o in read_objects(out)} >= {"prefill-0", "decode-0"}
