"""`pdserve k8s` beyond the shipped configs: what it refuses (naming the key), rank groups that
span hosts (LeaderWorkerSet only when asked), and the flags and `k8s:` keys."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cluster.config import CONFIGS_DIR, read_config
from cluster.k8s.names import CONFIG_FILE, CONFIG_MAP
from tests.cluster.k8s_util import containers, named, of_kind, refusal, render, write_config

LOCAL = CONFIGS_DIR / "local-cpu.yaml"
MULTI_HOST = (
    "--set", "prefill.0.engine.tp_size=2", "--set", "prefill.0.engine.nnodes=2",
    "--set", "prefill.0.engine.dist_init_addr=10.0.0.1:29500",
)  # fmt: skip


def config_with(tmp_path: Path, change: Any) -> Path:
    """local-cpu.yaml, changed by `change(data)`, written under tmp_path."""
    data = copy.deepcopy(read_config(LOCAL))
    change(data)
    return write_config(tmp_path / "cluster.yaml", data)


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (("--set", "prefill.0.name=Prefill_0"), "prefill.0.name: 'Prefill_0' cannot name"),
        (("--set", f"decode.0.name=d{'x' * 60}"), "decode.0.name:"),
        (("--namespace", "Serving"), "k8s.namespace: 'Serving' cannot name"),
        (("--set", "prefill.0.bootstrap_port=30001"), "prefill.0.bootstrap_port"),
        (("--set", "model.path=models/llama", "--set", "model.make=null"), "model.path:"),
        (("--set", "k8s.gateway_service_type=Ingress"), "k8s.gateway_service_type:"),
        (("--set", "k8s.node_memory=lots"), "k8s.node_memory: 'lots' is not a Kubernetes"),
        (("--set", "k8s.imag=x"), "did you mean 'image'?"),
        (("--set", "prefill.0.engine.node_rank=1"), "prefill.0.engine.node_rank:"),
    ],
    ids=["case", "length", "namespace", "port", "model", "service", "quantity", "typo", "rank"],
)
def test_a_config_that_cannot_run_there_is_refused_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, ...], key: str
) -> None:
    assert key in refusal(capsys, tmp_path / "k8s", LOCAL, *flags)


def test_an_instance_without_a_name_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_with(tmp_path, lambda data: data["decode"][0].pop("name"))
    assert "decode.0: missing required key 'name'" in refusal(capsys, tmp_path / "k8s", config)


def test_a_rendezvous_port_that_clashes_in_the_leader_pod_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = (*MULTI_HOST, "--set", "prefill.0.engine.dist_init_addr=h:30001", "--lws")
    err = refusal(capsys, tmp_path / "k8s", LOCAL, *flags)
    assert "prefill.0.engine.dist_init_addr: port 30001 is also prefill.0.port" in err


def test_a_rank_group_across_hosts_needs_asking_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refusal(capsys, tmp_path / "k8s", LOCAL, *MULTI_HOST)
    assert "prefill.0.engine.nnodes: 'prefill-0' spans 2 hosts" in err
    assert "--lws" in err and "k8s.multi_host=true" in err


@pytest.mark.parametrize("ask", [("--lws",), ("--set", "k8s.multi_host=true")])
def test_a_rank_group_across_hosts_is_a_leader_worker_set(
    tmp_path: Path, ask: tuple[str, ...]
) -> None:
    objects = render(tmp_path / "k8s", LOCAL, *MULTI_HOST, *ask)
    assert not [o for o in of_kind(objects, "StatefulSet") if o["metadata"]["name"] == "prefill-0"]
    lws = named(objects, "LeaderWorkerSet", "prefill-0")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    (leader,) = template["leaderTemplate"]["spec"]["containers"]
    (worker,) = template["workerTemplate"]["spec"]["containers"]
    assert leader["args"] == ["prefill", "--config", "/etc/pdserve/cluster.yaml",
                              "--name", "prefill-0"]  # fmt: skip
    assert worker["args"][5:] == [
        "--node-rank", "$(NODE_RANK)",
        "--set", "prefill.0.host=prefill-0-0-$(NODE_RANK).prefill-0.default.svc.cluster.local",
    ]  # fmt: skip
    assert {p["name"]: p["containerPort"] for p in leader["ports"]} == {
        "http": 30001, "bootstrap": 8998, "rendezvous": 29500,
    }  # fmt: skip
    service = named(objects, "Service", "prefill-0-leader")
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    pods = yaml.safe_load(named(objects, "ConfigMap", CONFIG_MAP)["data"][CONFIG_FILE])
    engine = pods["prefill"][0]["engine"]
    assert engine["dist_init_addr"] == "prefill-0-0.prefill-0.default.svc.cluster.local:29500"
    for template_spec in (template["leaderTemplate"], template["workerTemplate"]):
        pod = {"apiVersion": "v1", "kind": "Pod", **template_spec}  # a template is a pod's shape
        kubernetes_validate.validate(pod, "1.29.0", strict=True)


def test_flags_and_k8s_keys_shape_every_object(tmp_path: Path) -> None:
    objects = render(
        tmp_path / "k8s", LOCAL, "--image", "registry.local/pdserve:1.2", "--namespace", "llm",
        "--set", "k8s.gateway_service_type=LoadBalancer", "--set", "k8s.node_cpu=500m",
        "--set", "k8s.service_monitor=false", "--set", "prefill.0.drain_timeout_s=120",
        "--set", "k8s.gateway_cpu=2",
    )  # fmt: skip
    assert {o["metadata"]["namespace"] for o in objects} == {"llm"}
    assert {c["image"] for _, c in containers(objects)} == {"registry.local/pdserve:1.2"}
    assert named(objects, "Service", "gateway")["spec"]["type"] == "LoadBalancer"
    assert not of_kind(objects, "ServiceMonitor")
    prefill = named(objects, "StatefulSet", "prefill-0")["spec"]["template"]
    assert prefill["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "500m"
    assert prefill["spec"]["terminationGracePeriodSeconds"] > 120 + 5
    gateway = named(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert gateway["containers"][0]["resources"]["requests"]["cpu"] == 2
    pods = yaml.safe_load(named(objects, "ConfigMap", CONFIG_MAP)["data"][CONFIG_FILE])
    assert pods["decode"][0]["host"] == "decode-0-0.decode-0.llm.svc.cluster.local"


def test_a_checkpoint_path_is_mounted_where_the_config_says(tmp_path: Path) -> None:
    flags = ("--set", "model.make=null", "--set", "model.path=/models/llama")
    claim = ("--set", "k8s.model_claim=llama-weights")
    for extra, source in (((), "hostPath"), (claim, "persistentVolumeClaim")):
        objects = render(tmp_path / source, LOCAL, *flags, *extra)
        for template, container in containers(objects):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            assert source in volumes["model"]
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts["model"] == "/models/llama"


def test_nodes_need_no_hosts_of_their_own(tmp_path: Path) -> None:
    """Scaling a pool: a new entry with the same port as its peers (each has its own pod)."""
    config = config_with(tmp_path, lambda data: data["decode"].append({"name": "decode-1",
                                                                        "port": 30002}))  # fmt: skip
    objects = render(tmp_path / "k8s", config)
    assert named(objects, "StatefulSet", "decode-1")["spec"]["serviceName"] == "decode-1"
    pods = yaml.safe_load(named(objects, "ConfigMap", CONFIG_MAP)["data"][CONFIG_FILE])
    assert pods["decode"][1] == {
        "name": "decode-1", "port": 30002, "host": "decode-1-0.decode-1.default.svc.cluster.local"
    }  # fmt: skip
