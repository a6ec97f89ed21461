"""The cluster config as data: the model, the nodes, the gateway, and what each component
runs with (`node_settings`, `gateway_settings`). Loading and checking it: cluster/config.py and
cluster/validate.py."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from api.settings import GatewaySettings, Instance, setting
from engine.options import EngineOptions
from modelgen.spec import MakeSpec
from node.settings import NodeSettings, check_log_stats_interval, check_node_choices
from transfer.config import TransferConfig

from .k8s.settings import K8sSettings
from .launch_settings import LaunchSettings
from .modelcache import ensure_model, model_dir
from .schema import ConfigError, did_you_mean

GATEWAY = "gateway"  # the gateway's component name


@dataclass(frozen=True)
class ModelSpec:
    path: str | None = setting(None, "a Hugging Face checkpoint directory (give path or make)")
    make: MakeSpec | None = setting(None, "or a tiny generated checkpoint (model.make below)")


# A node entry's other fields are NodeSettings fields (None: NodeSettings' default; the
# reference takes their help from there).
@dataclass(frozen=True)
class PrefillSpec:
    name: str = setting(MISSING, "the component's name (logs, `--name`)")
    port: int = setting(MISSING, "the node's HTTP port")
    bootstrap_port: int = setting(MISSING, "the KV bootstrap server's port")
    host: str = setting("127.0.0.1", "the node's address (HTTP, bootstrap, transfer engine)")
    engine: EngineOptions = field(
        default_factory=EngineOptions, metadata={"help": "engine options over the cluster's"}
    )
    drain_timeout_s: float | None = None
    log_level: str | None = None
    log_stats_interval_s: float | None = None

    def __post_init__(self) -> None:
        check_node_choices(self.log_level, None, None)
        check_log_stats_interval(self.log_stats_interval_s)


@dataclass(frozen=True)
class DecodeSpec:
    name: str = setting(MISSING, "the component's name (logs, `--name`)")
    port: int = setting(MISSING, "the node's HTTP port")
    host: str = setting("127.0.0.1", "the node's address (HTTP, transfer engine)")
    engine: EngineOptions = field(
        default_factory=EngineOptions, metadata={"help": "engine options over the cluster's"}
    )
    local_prefill_threshold: int | None = None
    decode_headroom_tokens: int | None = None
    prealloc_timeout_s: float | None = None
    drain_timeout_s: float | None = None
    log_level: str | None = None
    log_stats_interval_s: float | None = None
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        check_node_choices(self.log_level, self.reasoning_parser, self.tool_call_parser)
        check_log_stats_interval(self.log_stats_interval_s)


@dataclass(frozen=True)
class ClusterConfig:
    model: ModelSpec
    decode: tuple[DecodeSpec, ...]
    prefill: tuple[PrefillSpec, ...] = ()
    served_model_name: str | None = None
    engine: EngineOptions = field(default_factory=EngineOptions)
    # NOTE: host and bootstrap_port come from each node's entry, not from this section
    transfer: TransferConfig = field(
        default_factory=TransferConfig, metadata={"skip": ("host", "bootstrap_port")}
    )
    gateway: GatewaySettings = field(default_factory=GatewaySettings)  # without instances
    launch: LaunchSettings = field(default_factory=LaunchSettings)  # `pdserve launch` only
    k8s: K8sSettings = field(default_factory=K8sSettings)  # `pdserve k8s` only

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
        # NOTE: every other field of a node spec is a NodeSettings field; None: its default
        placed = ("engine", "bootstrap_port")
        own = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        engine = spec.engine
        if engine.threads is None:
            threads = self.default_threads(spec.host, ranks_here(engine))
            engine = dataclasses.replace(engine, threads=threads)
        port = spec.bootstrap_port if isinstance(spec, PrefillSpec) else 0
        return NodeSettings(
            role=role,  # type: ignore[arg-type]
            model=self.model_path(),
            served_model_name=self.served_model_name,
            engine=engine,
            transfer=dataclasses.replace(self.transfer, host=spec.host, bootstrap_port=port),
            **{k: v for k, v in own.items() if v is not None and k not in placed},
        )

    def default_threads(self, host: str, ranks: int = 1) -> int:
        """This machine's cores split among the rank processes of the nodes on `host`: the
        share of a node with `ranks` of them (at least one thread per rank).

        NOTE: torch's default (every core in every process) oversubscribes a machine that runs
        several nodes; on 2 cores a 1P1D ran 9x slower with 2 threads per node than with 1.
        """
        total = sum(ranks_here(n.engine) for n in (*self.prefill, *self.decode) if n.host == host)
        return max(ranks, (os.cpu_count() or 1) * ranks // max(total, 1))

    def gateway_settings(self) -> GatewaySettings:
        return dataclasses.replace(
            self.gateway,
            prefill=tuple(
                Instance(http_url(p.host, p.port), p.bootstrap_port) for p in self.prefill
            ),
            decode=tuple(Instance(http_url(d.host, d.port)) for d in self.decode),
            tokenizer=self.gateway.tokenizer or self.model_path(),
        )


def ranks_here(engine: EngineOptions) -> int:
    """The rank processes a node runs on its own host."""
    return engine.tp_size // engine.nnodes


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
