"""The YAML schema of a whole cluster, resolved to the settings each component runs with.

```yaml
model: {path: DIR}                # or make: {arch: qwen3, layers: 2, hidden: 64, ...}
served_model_name: tiny-qwen3     # the model id clients use
engine: {page_size: 16}           # engine options of every node (api/settings.py names them)
transfer: {backend: mooncake, protocol: tcp}
gateway: {port: 30000, prefill_policy: cache_aware}   # any GatewaySettings field
prefill: [{name: prefill-0, port: 30001, bootstrap_port: 8998}]
decode: [{name: decode-0, port: 30002, engine: {max_running: 64}}]
```

`load_cluster(path, overrides)` reads, applies `--set` overrides and validates; the result hands
out `NodeSettings` and `GatewaySettings` (api/settings.py), which is all a component runs on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from api.settings import GatewaySettings, Instance, NodeSettings, TransferSettings
from modelgen.spec import MakeSpec

from .modelcache import ensure_model, model_dir
from .overrides import apply_overrides
from .schema import ConfigError, build, did_you_mean
from .validate import GATEWAY, check_cluster

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "local-cpu.yaml"


@dataclass(frozen=True)
class EngineSpec:
    """Engine options (the keyword names of `engine.llm.engine_config`); None: not set here."""

    dtype: str | None = None
    device: str | None = None
    attention_backend: str | None = None
    page_size: int | None = None
    max_total_tokens: int | None = None
    mem_fraction: float | None = None
    enable_prefix_cache: bool | None = None
    max_running: int | None = None
    max_batch_tokens: int | None = None
    chunk_size: int | None = None
    max_model_len: int | None = None
    seed: int | None = None
    threads: int | None = None  # torch threads of the node's scheduler process
    cpu_kernels: bool | None = None  # native CPU LM head (default on where it can run)

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ModelSpec:
    path: str | None = None  # a Hugging Face checkpoint directory
    make: MakeSpec | None = None  # or a tiny generated one


@dataclass(frozen=True)
class PrefillSpec:
    name: str
    port: int
    bootstrap_port: int
    host: str = "127.0.0.1"
    engine: EngineSpec = field(default_factory=EngineSpec)  # overrides the cluster's engine
    log_level: str | None = None


@dataclass(frozen=True)
class DecodeSpec:
    name: str
    port: int
    host: str = "127.0.0.1"
    engine: EngineSpec = field(default_factory=EngineSpec)
    local_prefill_threshold: int | None = None  # None: NodeSettings' default
    decode_headroom_tokens: int | None = None
    prealloc_timeout_s: float | None = None
    log_level: str | None = None


@dataclass(frozen=True)
class ClusterConfig:
    model: ModelSpec
    decode: tuple[DecodeSpec, ...]
    prefill: tuple[PrefillSpec, ...] = ()
    served_model_name: str | None = None
    engine: EngineSpec = field(default_factory=EngineSpec)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)  # without instances

    def component_names(self) -> tuple[str, ...]:
        """Every component, in start order: prefill nodes, decode nodes, the gateway."""
        return (*(p.name for p in self.prefill), *(d.name for d in self.decode), GATEWAY)

    def role_of(self, name: str) -> str:
        """'prefill', 'decode' or 'gateway'."""
        return GATEWAY if name == GATEWAY else self.node_spec(name)[0]

    def address_of(self, name: str) -> tuple[str, int]:
        """(host, port) where component `name` serves HTTP."""
        spec = self.gateway if name == GATEWAY else self.node_spec(name)[1]
        return spec.host, spec.port

    def model_path(self) -> str:
        """The checkpoint directory (for `model.make`: its cache dir, written or not)."""
        if self.model.make is not None:
            return str(model_dir(self.model.make))
        return str(Path(self.model.path or "").expanduser())

    def ensure_model(self) -> str:
        """`model_path()`, after generating the checkpoint if `model.make` asks for one."""
        if self.model.make is not None:
            return str(ensure_model(self.model.make))
        return self.model_path()

    def node_spec(self, name: str) -> tuple[str, PrefillSpec | DecodeSpec]:
        for role, nodes in (("prefill", self.prefill), ("decode", self.decode)):
            for node in nodes:
                if node.name == name:
                    return role, node
        names = self.component_names()
        raise ConfigError(f"no component named {name!r} in the config" + did_you_mean(name, names))

    def node_settings(self, name: str) -> NodeSettings:
        role, spec = self.node_spec(name)
        # NOTE: every field of a node spec but `engine` is a NodeSettings field; None: its default
        own = {
            f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "engine"
        }
        engine = {**self.engine.options(), **spec.engine.options()}
        if "threads" not in engine:
            engine["threads"] = self.default_threads(spec.host)
        return NodeSettings(
            role=role,  # type: ignore[arg-type]
            model=self.model_path(),
            served_model_name=self.served_model_name,
            engine=engine,
            transfer=self.transfer,
            **{key: value for key, value in own.items() if value is not None},
        )

    def default_threads(self, host: str) -> int:
        """This machine's cores split among the nodes on `host`.

        NOTE: torch's default (every core in every process) oversubscribes a machine that runs
        several nodes; on 2 cores a 1P1D ran 9x slower with 2 threads per node than with 1.
        """
        nodes = sum(1 for n in (*self.prefill, *self.decode) if n.host == host)
        return max(1, (os.cpu_count() or 1) // max(nodes, 1))

    def gateway_settings(self) -> GatewaySettings:
        return dataclasses.replace(
            self.gateway,
            prefill=tuple(
                Instance(http_url(p.host, p.port), p.bootstrap_port) for p in self.prefill
            ),
            decode=tuple(Instance(http_url(d.host, d.port)) for d in self.decode),
            tokenizer=self.gateway.tokenizer or self.model_path(),
        )


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        return parse_cluster(apply_overrides(raw or {}, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_cluster(data: Any) -> ClusterConfig:
    """A validated ClusterConfig from YAML-shaped data."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of keys (model, prefill, decode, ...)")
    rest = {k: v for k, v in data.items() if k != GATEWAY}
    config = build(ClusterConfig, rest, "")
    gateway = build(GatewaySettings, data.get(GATEWAY) or {}, GATEWAY, skip=("prefill", "decode"))
    config = dataclasses.replace(config, gateway=gateway)
    check_cluster(config)
    return config
