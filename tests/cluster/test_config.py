"""Cluster YAML: validation errors, overrides, resolved settings, generated models, shipped configs."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.settings import GatewaySettings, Instance
from cluster import modelcache, reference
from cluster.cli import build_parser
from cluster.cli import main as pdserve
from cluster.config import CONFIGS_DIR, DEFAULT_CONFIG, load_cluster, parse_cluster
from cluster.launch_settings import LaunchSettings
from cluster.modelcache import ensure_model, model_dir
from cluster.schema import ConfigError
from engine.options import EngineOptions
from modelgen.spec import MakeSpec, spec_from_flags
from node.settings import NodeSettings
from transfer import TransferConfig

BASE: dict[str, Any] = {
    "model": {"path": "/models/tiny"},
    "served_model_name": "tiny",
    "engine": {"page_size": 16, "dtype": "float32"},
    "transfer": {"backend": "mooncake", "protocol": "tcp"},
    "gateway": {"port": 30000, "prefill_policy": "round_robin", "api_key": "k"},
    "prefill": [{"name": "p0", "port": 30001, "bootstrap_port": 8998}],
    "decode": [
        {"name": "d0", "port": 30002, "engine": {"max_running": 8}, "local_prefill_threshold": 64}
    ],
}


def config_with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_cluster(data)
    return str(info.value)


# --- validation ----------------------------------------------------------------------------------


def test_unknown_key_names_path_and_suggests() -> None:
    data = config_with(gateway={"port": 30000, "prefill_polcy": "random"})
    message = error_of(data)
    assert "gateway.prefill_polcy" in message
    assert "did you mean 'prefill_policy'?" in message


def test_unknown_key_nested_in_a_list_item() -> None:
    data = config_with(prefill=[{"name": "p0", "port": 1, "bootstrap_port": 2, "engin": {}}])
    message = error_of(data)
    assert "prefill.0.engin" in message and "did you mean 'engine'?" in message


def test_unknown_engine_option_and_top_level_key() -> None:
    assert "did you mean 'page_size'?" in error_of(config_with(engine={"page_sise": 16}))
    message = error_of({**BASE, "modle": {}})
    assert "unknown key 'modle' at the top level" in message and "'model'" in message


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    message = error_of(config_with(transfer={"zzz": 1}))
    assert "transfer.zzz" in message and "valid: " in message and "backend" in message


def test_missing_required_fields() -> None:
    assert "prefill.0: missing required key 'bootstrap_port'" in error_of(
        config_with(prefill=[{"name": "p0", "port": 30001}])
    )
    assert "missing required key 'decode'" in error_of({"model": {"path": "/m"}})
    assert "missing required key 'arch'" in error_of(config_with(model={"make": {"layers": 2}}))


def test_model_needs_exactly_one_of_path_and_make() -> None:
    assert "exactly one of path" in error_of(config_with(model={}))
    both = {"path": "/m", "make": {"arch": "qwen3"}}
    assert "exactly one of path" in error_of(config_with(model=both))


def test_wrong_types() -> None:
    message = error_of(config_with(gateway={"port": "thirty"}))
    assert message == "gateway.port: expected int, got str 'thirty'"
    assert "quote it" in error_of(config_with(gateway={"api_key": 1234}))
    assert "prefill: expected a list" in error_of(config_with(prefill={"name": "p0"}))
    assert "expected bool" in error_of(config_with(engine={"enable_prefix_cache": "yes"}))


def test_floats_accept_ints_but_ints_reject_bools() -> None:
    cluster = parse_cluster(config_with(engine={"mem_fraction": 1}))
    assert cluster.engine.mem_fraction == 1.0
    assert "expected int" in error_of(config_with(engine={"page_size": True}))


def test_port_clash_names_both_components() -> None:
    decode = [{"name": "d0", "port": 8998}]
    message = error_of(config_with(decode=decode))
    assert "port clash on 127.0.0.1:8998" in message
    assert "prefill 'p0' bootstrap_port" in message and "decode 'd0' port" in message


def test_port_clash_sees_localhost_as_loopback_and_other_hosts_as_apart() -> None:
    decode = [{"name": "d0", "host": "localhost", "port": 30000}]
    assert "gateway port" in error_of(config_with(decode=decode))
    elsewhere = [{"name": "d0", "host": "10.0.0.2", "port": 30000}]
    assert parse_cluster(config_with(decode=elsewhere)).decode[0].host == "10.0.0.2"


def test_port_out_of_range() -> None:
    assert "70000 is not a port number" in error_of(config_with(gateway={"port": 70000}))


def test_duplicate_and_reserved_names() -> None:
    decode = [{"name": "p0", "port": 30002}]
    message = error_of(config_with(decode=decode))
    assert "decode.0.name: duplicate name 'p0' (also at prefill.0.name)" in message
    assert "names the gateway" in error_of(config_with(decode=[{"name": "gateway", "port": 1}]))
    assert "not a usable name" in error_of(config_with(decode=[{"name": "a/b", "port": 1}]))


def test_bad_backend_policy_and_protocol() -> None:
    message = error_of(config_with(transfer={"backend": "mooncak"}))
    assert "transfer.backend: 'mooncak' is not one of mooncake, nccl, nixl, none" in message
    assert "did you mean 'mooncake'?" in message
    message = error_of(config_with(gateway={"decode_policy": "least_loaded"}))
    assert "gateway.decode_policy: unknown policy 'least_loaded'" in message
    assert "did you mean 'least_load'?" in message
    assert "transfer.protocol" in error_of(config_with(transfer={"protocol": "udp"}))


def test_log_levels_and_parsers_fail_at_load() -> None:
    """Choices a node or the gateway would refuse at start fail at load, naming the key (a
    node refusing them only when launched was restarted again and again)."""
    gateway = {**BASE["gateway"], "log_level": "verbose"}
    message = error_of(config_with(gateway=gateway))
    assert "gateway.log_level: 'verbose' is unknown (use one of debug, info" in message
    prefill = [{**BASE["prefill"][0], "log_level": "loud"}]
    assert "prefill.0.log_level: 'loud' is unknown" in error_of(config_with(prefill=prefill))
    for key, value, hint in (
        ("log_level", "trace", "debug, info, warning, error"),
        ("reasoning_parser", "foo", "deepseek-r1, qwen3"),
        ("tool_call_parser", "bar", "hermes, llama3, deepseek-v3"),
    ):
        decode = [{**BASE["decode"][0], key: value}]
        message = error_of(config_with(decode=decode))
        assert f"decode.0.{key}: {value!r} is unknown (use one of {hint})" in message
    decode = [{**BASE["decode"][0], "log_level": "INFO", "tool_call_parser": "llama3"}]
    node = parse_cluster(config_with(decode=decode)).node_settings("d0")
    assert (node.log_level, node.tool_call_parser) == ("INFO", "llama3")


def test_transfer_timeouts_must_be_positive_and_ordered() -> None:
    assert "transfer.transfer_timeout_s: must be > 0" in error_of(
        config_with(transfer={"transfer_timeout_s": 0})
    )
    late = {"heartbeat_interval_s": 5, "heartbeat_timeout_s": 2}
    assert "transfer.heartbeat_timeout_s: must exceed heartbeat_interval_s" in error_of(
        config_with(transfer=late)
    )
    assert "transfer.quarantine_s: must be >= 0" in error_of(
        config_with(transfer={"quarantine_s": -1})
    )
    assert parse_cluster(config_with(transfer={"quarantine_s": 0})).transfer.quarantine_s == 0


def test_launch_section_sets_the_supervision_and_is_checked() -> None:
    assert parse_cluster(BASE).launch == LaunchSettings()
    launch = {"restart_backoff_s": 0.5, "restart_budget": 0, "grace_s": 60}
    assert parse_cluster(config_with(launch=launch)).launch == LaunchSettings(**launch)
    assert "launch.restart_budget: must be >= 0 (0: never), got -1" in error_of(
        config_with(launch={"restart_budget": -1})
    )
    assert "launch.grace_s: must be >= 0" in error_of(config_with(launch={"grace_s": -5}))
    assert "launch.restart_backoff_s: must be > 0" in error_of(
        config_with(launch={"restart_backoff_s": -1})
    )
    assert "launch.restart_backoff_max_s: must be >= restart_backoff_s (2.0 < 4.0)" in error_of(
        config_with(launch={"restart_backoff_s": 4, "restart_backoff_max_s": 2})
    )
    assert "launch.restart_budget: expected int, got float 2.5" in error_of(
        config_with(launch={"restart_budget": 2.5})
    )
    assert "did you mean 'grace_s'?" in error_of(config_with(launch={"grace": 3}))


def test_at_least_one_decode_node() -> None:
    assert "at least one decode node" in error_of(config_with(decode=[]))


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, config_with(gateway={"portt": 1}))
    with pytest.raises(ConfigError, match=rf"^{path}: gateway.portt"):
        load_cluster(path)


# --- overrides -----------------------------------------------------------------------------------


def test_set_overrides_scalars_and_list_items(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    cluster = load_cluster(
        path,
        ["gateway.port=31000", "prefill.0.engine.max_running=32", "gateway.api_key=null"],
    )
    assert cluster.gateway.port == 31000
    assert cluster.gateway.api_key is None
    assert cluster.node_settings("p0").engine.max_running == 32
    assert cluster.node_settings("d0").engine.max_running == 8


def test_set_values_are_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    overrides = [
        "engine.enable_prefix_cache=false",
        "engine.mem_fraction=0.5",
        "served_model_name=x",
    ]
    cluster = load_cluster(path, overrides)
    assert cluster.engine.enable_prefix_cache is False
    assert cluster.engine.mem_fraction == 0.5
    assert cluster.served_model_name == "x"


def test_set_errors(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    cases = {
        "prefill.3.port=1": "index 3 is out of range",
        "prefill.first.port=1": "address its items by index",
        "gateway.port.x=1": "gateway.port is int 30000, not a mapping",
        "gateway.port": "expects dotted.key=value",
        "gateway.portt=1": "did you mean 'port'?",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError, match=expected):
            load_cluster(path, [text])


# --- resolved settings ---------------------------------------------------------------------------


def test_node_settings_merge_engine_options() -> None:
    cluster = parse_cluster(config_with(transfer={"backend": "nixl", "bootstrap_timeout_s": 5}))
    threads = max(1, (os.cpu_count() or 1) // 2)  # the cores split between p0 and d0
    prefill = cluster.node_settings("p0")
    assert prefill == NodeSettings(
        role="prefill",
        model="/models/tiny",
        name="p0",
        host="127.0.0.1",
        port=30001,
        served_model_name="tiny",
        engine=EngineOptions(page_size=16, dtype="float32", threads=threads),
        transfer=TransferConfig(
            backend="nixl", bootstrap_timeout_s=5.0, host="127.0.0.1", bootstrap_port=8998
        ),
    )
    decode = cluster.node_settings("d0")
    assert decode.role == "decode" and decode.transfer.bootstrap_port == 0
    assert decode.engine == EngineOptions(
        page_size=16, dtype="float32", max_running=8, threads=threads
    )
    assert decode.local_prefill_threshold == 64
    assert decode.decode_headroom_tokens == NodeSettings.decode_headroom_tokens


def test_threads_default_splits_cores_among_a_hosts_nodes() -> None:
    cluster = parse_cluster(config_with(decode=[{"name": "d0", "host": "10.0.0.2", "port": 30002}]))
    cores = os.cpu_count() or 1
    assert cluster.node_settings("p0").engine.threads == cores  # alone on 127.0.0.1
    pinned = parse_cluster(config_with(engine={"threads": 3}))
    assert pinned.node_settings("p0").engine.threads == 3


def test_gateway_settings_list_instances() -> None:
    data = config_with(decode=[{"name": "d0", "host": "10.0.0.2", "port": 30002}])
    settings = parse_cluster(data).gateway_settings()
    assert settings.prefill == (Instance("http://127.0.0.1:30001", 8998),)
    assert settings.decode == (Instance("http://10.0.0.2:30002"),)
    assert settings.port == 30000 and settings.prefill_policy == "round_robin"
    assert settings.api_key == "k"
    assert settings.decode_policy == GatewaySettings.decode_policy
    assert settings.tokenizer == "/models/tiny"


def test_component_names_and_unknown_component() -> None:
    cluster = parse_cluster(BASE)
    assert cluster.component_names() == ("p0", "d0", "gateway")
    assert [cluster.role_of(n) for n in cluster.component_names()] == [
        "prefill",
        "decode",
        "gateway",
    ]
    with pytest.raises(ConfigError, match="did you mean 'd0'"):
        cluster.node_settings("d00")


def test_empty_sections_read_as_defaults() -> None:
    cluster = parse_cluster(config_with(engine=None, gateway=None))
    assert cluster.engine == EngineOptions()
    assert cluster.gateway.port == GatewaySettings.port


# --- model.make ----------------------------------------------------------------------------------


def test_make_model_is_generated_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "cache"))
    make = {"arch": "qwen3", "layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1}
    cluster = parse_cluster(config_with(model={"make": make}))
    path = Path(cluster.model_path())
    assert path.parent == tmp_path / "cache" and not path.exists()
    assert Path(cluster.ensure_model()) == path
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert list(path.glob("*.safetensors"))
    assert cluster.node_settings("d0").model == str(path)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert Path(cluster.ensure_model()) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == [path.name]
    # readable by others (a container mounting the cache may run as another user)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in path.iterdir()} == {0o644}


def test_make_model_cli_never_overwrites_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"real weights")
    flags = ["make-model", "--arch", "llama", "--out", str(out), "--layers", "1", "--hidden", "32"]
    assert pdserve(flags) == 2
    assert "exists and is not empty (--force overwrites it)" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"real weights"
    assert pdserve([*flags, "--force"]) == 0
    assert (out / "config.json").is_file()


def test_make_args_pick_the_directory(tmp_path: Path) -> None:
    a = model_dir(MakeSpec("qwen3"), tmp_path)
    assert a == model_dir(MakeSpec("qwen3", layers=2), tmp_path)
    assert a != model_dir(MakeSpec("qwen3", layers=3), tmp_path)
    assert a.name.startswith("qwen3-")


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (MakeSpec("qwen3"), "qwen3-6b960d53c85074de"),
        (MakeSpec("llama", layers=1, hidden=32, heads=2, kv_heads=1), "llama-9d92c1b4c79789ae"),
        (
            MakeSpec(
                "deepseek_v3", fp8=True, tokenizer="qwen", dtype="bfloat16", intermediate=96, seed=3
            ),
            "deepseek_v3-80c1390800c289f6",
        ),
    ],
)
def test_cache_directory_names_stay_put(make: MakeSpec, name: str) -> None:
    """Models already in users' caches keep being found: these names were written before
    MakeSpec moved to modelgen (a changed field name or default would move them)."""
    assert model_dir(make, Path("/cache")).name == name


def test_make_model_flags_are_the_spec_fields() -> None:
    """`pdserve make-model` parses into the same MakeSpec that `model.make` reads."""
    parser = build_parser()
    args = parser.parse_args(["make-model", "--arch", "qwen3", "--out", "x"])
    assert spec_from_flags(args) == MakeSpec("qwen3") and args.out == "x"
    flags = ["--kv-heads", "1", "--intermediate", "96", "--tokenizer", "deepseek", "--fp8"]
    args = parser.parse_args(["make-model", "--arch", "llama", "--out", "x", *flags])
    want = MakeSpec("llama", kv_heads=1, intermediate=96, tokenizer="deepseek", fp8=True)
    assert spec_from_flags(args) == want
    cluster = parse_cluster(config_with(model={"make": dataclasses.asdict(want)}))
    assert cluster.model.make == want


def test_racing_writers_generate_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    started = threading.Barrier(4)

    def fake_make_model(arch: str, out: Path, **kw: Any) -> Path:
        calls.append(Path(out))
        (Path(out) / "config.json").write_text("{}")
        return Path(out)

    monkeypatch.setattr("modelgen.make.make_model", fake_make_model)
    results: list[Path] = []

    def worker() -> None:
        started.wait()
        results.append(ensure_model(MakeSpec("qwen3"), tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        results[0].name
    ]


def test_failed_generation_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(modelcache.CACHE_ENV, str(tmp_path))

    def half_written(arch: str, out: Path, **_kw: Any) -> Path:
        (Path(out) / "config.json").write_text("{}")
        raise ValueError(f"{arch}: no init rule for a weight")

    monkeypatch.setattr("modelgen.make.make_model", half_written)
    with pytest.raises(ValueError, match=r"model\.make: qwen3: no init rule"):
        ensure_model(MakeSpec("qwen3"))
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


# --- shipped configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cluster = load_cluster(path)
    for name in cluster.component_names()[:-1]:
        assert cluster.node_settings(name).name == name
    assert cluster.gateway_settings().decode


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_pass_dry_run(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pdserve(["launch", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in load_cluster(path).component_names():
        assert f"--config {path.resolve()} --name {name}" in out
    assert out.splitlines()[-1].startswith("# config ok:")


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "launch"])
def test_unknown_attention_backend_fails_at_load(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dry_run: bool,
) -> None:
    def start(*_args: Any, **_kw: Any) -> None:
        raise AssertionError("the launcher started components from an invalid config")

    monkeypatch.setattr("cluster.launch.Supervisor", start)
    path = str(write(tmp_path, config_with(engine={"attention_backend": "flash-attn"})))
    assert pdserve(["launch", path, *(["--dry-run"] if dry_run else [])]) == 2
    err = capsys.readouterr().err
    want = "'flash-attn' is not registered (use one of: flashinfer, torch, triton)"
    assert f"engine.attention_backend: {want}" in err
    per_node = ["--set", "decode.0.engine.attention_backend=cudnn"]
    assert pdserve(["launch", path, "--set", "engine.attention_backend=torch", *per_node]) == 2
    assert "decode.0.engine.attention_backend: 'cudnn' is not registered" in (
        capsys.readouterr().err
    )


def test_model_make_is_checked_at_load() -> None:
    assert "model.make.arch: 'gpt9' is unknown (use one of" in error_of(
        config_with(model={"make": {"arch": "gpt9"}})
    )
    make = {"arch": "qwen3", "heads": 4, "kv_heads": 3}
    assert "model.make.heads: must be a multiple of kv_heads (4, 3)" in error_of(
        config_with(model={"make": make})
    )
    make = {"arch": "llama", "hidden": 66}
    assert "model.make.hidden: must be a multiple of heads (66, 4)" in error_of(
        config_with(model={"make": make})
    )
    assert "model.make.tokenizer: 'gpt2' is unknown" in error_of(
        config_with(model={"make": {"arch": "qwen3", "tokenizer": "gpt2"}})
    )


def test_engine_options_are_checked_with_their_path() -> None:
    message = error_of(config_with(engine={"page_size": 0}))
    assert message == "engine.page_size: must be >= 1, got 0"
    decode = [{"name": "d0", "port": 30002, "engine": {"max_total_tokens": 8}}]
    assert "decode.0.engine.max_total_tokens: (8) must hold at least one page" in error_of(
        config_with(decode=decode)
    )
    assert "engine.dtype: 'float8' is unknown" in error_of(config_with(engine={"dtype": "float8"}))
    assert "transfer.fault_fraction: must be between 0 and 1" in error_of(
        config_with(transfer={"fault_fraction": 2})
    )


def test_prefill_and_decode_pages_must_agree() -> None:
    decode = [{"name": "d0", "port": 30002, "engine": {"page_size": 32}}]
    message = error_of(config_with(decode=decode))
    assert "engine.page_size differs between nodes ('p0' 16, 'd0' 32)" in message
    assert "set engine.page_size alike" in message
    decode = [{"name": "d0", "port": 30002, "engine": {"dtype": "fp32"}}]
    assert parse_cluster(config_with(decode=decode)).decode[0].engine.dtype == "fp32"  # an alias
    decode = [{"name": "d0", "port": 30002, "engine": {"dtype": "bfloat16"}}]
    assert "engine.dtype differs" in error_of(config_with(decode=decode))
    colocated = config_with(
        prefill=[], decode=[{"name": "d0", "port": 2, "engine": {"page_size": 4}}]
    )
    assert parse_cluster(colocated).decode[0].engine.page_size == 4


def test_transfer_yaml_sets_every_transfer_option_but_the_node_placed_ones() -> None:
    options = {"device": "mlx5_0", "num_workers": 4, "max_batch_descriptors": 128}
    cluster = parse_cluster(config_with(transfer={**BASE["transfer"], **options}))
    settings = cluster.node_settings("p0").transfer
    assert (settings.device, settings.num_workers, settings.max_batch_descriptors) == (
        "mlx5_0",
        4,
        128,
    )
    assert (settings.host, settings.bootstrap_port) == ("127.0.0.1", 8998)
    assert "unknown key 'bootstrap_port' in transfer" in error_of(
        config_with(transfer={"bootstrap_port": 1})
    )


def test_launch_help_shows_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        pdserve(["launch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the config's launch.health_timeout_s, 600)" in text
    assert "(default: the config's launch.grace_s, 45)" in text
    assert "--dry-run" in text


def test_the_config_reference_is_written_from_the_settings_types() -> None:
    page = (CONFIGS_DIR.parent / "docs" / "CONFIG.md").read_text()
    assert page == reference.render(), "docs/CONFIG.md is stale: python -m cluster.reference"
    for cls in (EngineOptions, TransferConfig, GatewaySettings, MakeSpec, LaunchSettings):
        for f in dataclasses.fields(cls):
            if f.name not in ("prefill", "decode", "host", "bootstrap_port"):
                assert f"| `{f.name}` |" in page, f"{cls.__name__}.{f.name} is not in CONFIG.md"


def test_default_config_is_local_cpu() -> None:
    cluster = load_cluster(DEFAULT_CONFIG)
    assert DEFAULT_CONFIG.name == "local-cpu.yaml"
    assert cluster.gateway.port == 30000 and cluster.gateway.host == "127.0.0.1"
    assert len(cluster.prefill) == 1 and len(cluster.decode) == 1
    assert cluster.model.make is not None and cluster.model.make.arch == "qwen3"
    assert (cluster.model.make.layers, cluster.model.make.hidden) == (2, 64)
    assert (cluster.transfer.backend, cluster.transfer.protocol) == ("mooncake", "tcp")


# --- settings from the command line --------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Stand-in server modules: `pdserve prefill|decode|gateway` hand their settings here (and
    a node its loop class's role)."""
    got: dict[str, Any] = {}

    def serve_node(settings: NodeSettings, loop_cls: type) -> None:
        assert settings.role == loop_cls.ROLE  # type: ignore[attr-defined]
        got[settings.role] = settings

    node_server = types.ModuleType("node.server")
    node_server.serve_node = serve_node  # type: ignore[attr-defined]
    gateway_server = types.ModuleType("gateway.server")
    gateway_server.run = lambda settings: got.__setitem__("gateway", settings)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "node.server", node_server)
    monkeypatch.setitem(sys.modules, "gateway.server", gateway_server)
    return got


def test_component_commands_resolve_the_config(tmp_path: Path, served: dict[str, Any]) -> None:
    path = str(write(tmp_path, BASE))
    assert pdserve(["decode", "--config", path, "--name", "d0", "--set", "decode.0.port=4000"]) == 0
    expected = dataclasses.replace(parse_cluster(BASE).node_settings("d0"), port=4000)
    assert served["decode"] == expected
    assert pdserve(["prefill", "--config", path, "--name", "p0"]) == 0
    assert served["prefill"] == parse_cluster(BASE).node_settings("p0")
    assert pdserve(["gateway", "--config", path, "--set", "gateway.port=4001"]) == 0
    assert served["gateway"].port == 4001 and served["gateway"].decode


def test_component_command_errors(
    tmp_path: Path, served: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(write(tmp_path, BASE))
    assert pdserve(["prefill", "--config", path, "--name", "d0"]) == 2
    assert "'d0' is a decode component: start it with `pdserve decode`" in capsys.readouterr().err
    assert pdserve(["decode", "--config", path]) == 2
    assert "--name is required with --config" in capsys.readouterr().err
    assert pdserve(["decode", "--config", path, "--name", "d0", "--port", "1"]) == 2
    assert "use --set" in capsys.readouterr().err
    assert served == {}


def test_node_from_flags(served: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prefill", "--model", "/m", "--port", "31001", "--bootstrap-port", "8998"]
    extra = ["--engine-opt", "page_size=32", "--engine-opt", "enable_prefix_cache=false"]
    assert pdserve([*argv, *extra, "--transfer-backend", "nixl"]) == 0
    settings = served["prefill"]
    assert (settings.role, settings.model, settings.port, settings.transfer.bootstrap_port) == (
        "prefill",
        "/m",
        31001,
        8998,
    )
    assert settings.engine == EngineOptions(page_size=32, enable_prefix_cache=False)
    assert (settings.transfer.backend, settings.transfer.host) == ("nixl", "127.0.0.1")
    assert pdserve(["decode", "--model", "/m", "--port", "1", "--engine-opt", "page_sise=3"]) == 2
    assert "did you mean 'page_size'?" in capsys.readouterr().err
    assert pdserve(["prefill", "--model", "/m", "--port", "1"]) == 2
    assert "--bootstrap-port is required" in capsys.readouterr().err


def test_gateway_from_flags(served: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["gateway", "--prefill", "10.0.0.1:30001@8998", "--decode", "http://10.0.0.2:30002/"]
    assert pdserve([*argv, "--port", "31000", "--opt", "max_inflight=8", "--api-key", "k"]) == 0
    settings = served["gateway"]
    assert settings.prefill == (Instance("http://10.0.0.1:30001", 8998),)
    assert settings.decode == (Instance("http://10.0.0.2:30002"),)
    assert (settings.port, settings.max_inflight, settings.api_key) == (31000, 8, "k")
    assert pdserve(["gateway", "--prefill", "http://h:1", "--decode", "http://h:2"]) == 2
    assert "add the bootstrap port" in capsys.readouterr().err
    assert pdserve(["gateway", "--decode", "http://h:2", "--opt", "max_inflght=3"]) == 2
    assert "did you mean 'max_inflight'?" in capsys.readouterr().err
    assert pdserve(["gateway", "--prefill", "http://h:1@2"]) == 2
    assert "at least one --decode" in capsys.readouterr().err
