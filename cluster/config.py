"""The YAML schema of a whole cluster, resolved to the settings each component runs with.

```yaml
model: {path: DIR}                # or make: {arch: qwen3, layers: 2, hidden: 64, ...}
served_model_name: tiny-qwen3     # the model id clients use
engine: {page_size: 16}           # engine options of every node (engine/options.py)
transfer: {backend: mooncake, protocol: tcp}
gateway: {port: 30000, prefill_policy: cache_aware}   # any GatewaySettings field
prefill: [{name: prefill-0, port: 30001, bootstrap_port: 8998}]
decode: [{name: decode-0, port: 30002, engine: {max_running: 64}}]
launch: {restart_budget: 5, grace_s: 45}   # how `pdserve launch` restarts and stops (LaunchSettings)
```

`load_cluster(path, overrides)` reads, applies `--set` overrides and validates; the result hands
out `NodeSettings` (node/settings.py) and `GatewaySettings` (api/settings.py), which is all a
component runs on. A node's `engine` section overrides the cluster's, key by key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from api.settings import GatewaySettings
from engine.options import EngineOptions

from .overrides import apply_overrides
from .schema import ConfigError, build
from .spec import GATEWAY, ClusterConfig
from .validate import check_cluster

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "local-cpu.yaml"


def resolve_config_path(arg: str | None) -> Path:
    """A config file: `arg` itself, or a shipped config by name (`local-2p2d`); default: local-cpu."""
    if arg is None:
        if not DEFAULT_CONFIG.is_file():
            raise FileNotFoundError(
                f"the default config {DEFAULT_CONFIG} is missing (run from the repository or an "
                "editable install, `pip install -e .`, or give a CONFIG path)"
            )
        return DEFAULT_CONFIG
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    for candidate in (CONFIGS_DIR / arg, CONFIGS_DIR / f"{arg}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no config file {arg!r} (give a path, or one of: {shipped})")


def load_cluster(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ClusterConfig:
    """The validated cluster config of YAML file `path` with `dotted.key=value` overrides applied."""
    path = Path(path)
    data = read_config(path)
    try:
        return parse_cluster(apply_overrides(data, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_config(path: Path) -> Any:
    """The YAML data of config file `path`, as written (an empty file: an empty mapping)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return raw or {}


def parse_cluster(data: Any) -> ClusterConfig:
    """A validated ClusterConfig from YAML-shaped data."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of keys (model, prefill, decode, ...)")
    rest = {k: v for k, v in data.items() if k != GATEWAY}
    rest = with_node_engines(rest, data.get("engine"))
    config = build(ClusterConfig, rest, "")
    gateway = build(GatewaySettings, data.get(GATEWAY) or {}, GATEWAY, skip=("prefill", "decode"))
    config = dataclasses.replace(config, gateway=gateway)
    check_cluster(config)
    return config


def with_node_engines(data: dict[str, Any], engine: Any) -> dict[str, Any]:
    """`data` with each node's `engine` section laid over the cluster's (checked first, so its
    errors name `engine.KEY`, not a node's)."""
    engine = {} if engine is None else engine
    build(EngineOptions, engine, "engine")
    data = dict(data)
    for role in ("prefill", "decode"):
        nodes = data.get(role)
        if not isinstance(nodes, list):
            continue
        data[role] = [
            {**node, "engine": {**engine, **(node.get("engine") or {})}}
            if isinstance(node, dict) and isinstance(node.get("engine") or {}, dict)
            else node
            for node in nodes
        ]
    return data
