"""`pdserve launch`: every component of a cluster config on this machine, supervised as one.

Each component is `python -m cluster.cli prefill|decode|gateway --config CONFIG --name NAME
[--set ...]`, the same command a multi-host cluster runs on each host, so both resolve the
settings alike.
"""

from __future__ import annotations

import dataclasses
import errno
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from transfer import NO_TRANSFER

from .child import Component
from .config import load_cluster, resolve_config_path
from .launch_settings import LaunchSettings
from .schema import ConfigError
from .spec import GATEWAY, ClusterConfig, http_url, ranks_here
from .supervisor import Supervisor
from .validate import listeners

ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
MAX_CPU_KV_SHARE = 0.9  # of this machine's free memory, for all the KV pools of CPU nodes
FLAGS = {"health_timeout_s": "--timeout", "grace_s": "--grace"}


def launch(
    config: str | None,
    overrides: Sequence[str] = (),
    *,
    log_dir: Path | None = None,
    timeout_s: float | None = None,
    grace_s: float | None = None,
) -> int:
    """Start the cluster, print its URL when every component is healthy, supervise it until
    stopped. `timeout_s` and `grace_s`, when given, override the config's `launch` section."""
    path = resolve_config_path(config).resolve()  # the components may not share our cwd
    cluster = load_cluster(path, list(overrides))
    settings = with_flags(cluster.launch, health_timeout_s=timeout_s, grace_s=grace_s)
    check_can_listen(cluster)
    check_kv_memory(cluster)
    if cluster.model.make is not None and not Path(cluster.model_path()).exists():
        print(f"pdserve launch: writing model.make to {cluster.model_path()}", file=sys.stderr)
    cluster.ensure_model()  # once, here, before the nodes would race to write it
    components = cluster_components(cluster, path, overrides)
    for name, commands in other_hosts(cluster, path, overrides):
        print(
            f"pdserve launch: {name}'s rank group spans hosts (engine.nnodes); this launch runs "
            f"node rank 0 only, and it waits for the others: run on their hosts\n  "
            + "\n  ".join(commands),
            file=sys.stderr,
        )
    host, port = cluster.address_of(GATEWAY)
    ready = f"pdserve cluster ready: {http_url(ANY_ADDRESS.get(host, host), port)}/v1"
    return Supervisor(components, settings, log_dir).run(ready)


def with_flags(settings: LaunchSettings, **flags: float | None) -> LaunchSettings:
    """`settings` with the flags that were given (not None) over the config's values."""
    for name, value in flags.items():
        if value is None:
            continue
        try:
            settings = dataclasses.replace(settings, **{name: value})
        except ValueError as exc:  # "grace_s must be >= 0, ...": name the flag instead
            raise ConfigError(f"{FLAGS[name]}: {str(exc).partition(' ')[2]}") from None
    return settings


def dry_run(config: str | None, overrides: Sequence[str] = ()) -> int:
    """Check the config as `launch` does before starting anything (everything that needs neither
    the model files nor this machine's addresses and devices), print the command of each
    component, start nothing."""
    path = resolve_config_path(config).resolve()
    cluster = load_cluster(path, list(overrides))
    check_kv_memory(cluster)
    for component in cluster_components(cluster, path, overrides):
        host = cluster.address_of(component.name)[0]
        role = cluster.role_of(component.name)
        print(f"# {component.name}: {role} on {host}")
        print(shlex.join(component.argv))
    for name, commands in other_hosts(cluster, path, overrides):
        print(f"# {name}'s other node ranks, each on its own host (not started by launch)")
        print("\n".join(commands))
    host, port = cluster.address_of(GATEWAY)
    print(f"# config ok: {path}; the gateway would serve {http_url(host, port)}/v1")
    return 0


def other_hosts(
    cluster: ClusterConfig, path: Path, overrides: Sequence[str]
) -> list[tuple[str, list[str]]]:
    """Per node whose rank group spans hosts: the commands of its node ranks 1.., which run on
    the other hosts (launch starts node rank 0 only)."""
    found = []
    for node in (*cluster.prefill, *cluster.decode):
        if node.engine.nnodes > 1:
            argv = component_argv(cluster.role_of(node.name), path, node.name, overrides)
            ranks = range(1, node.engine.nnodes)
            found.append((node.name, [shlex.join([*argv, "--node-rank", str(r)]) for r in ranks]))
    return found


def cluster_components(
    cluster: ClusterConfig, path: Path, overrides: Sequence[str]
) -> list[Component]:
    """The command and health URL of every component; the gateway starts once nodes are up."""
    return [component_of(cluster, name, path, overrides) for name in cluster.component_names()]


def component_of(
    cluster: ClusterConfig, name: str, path: Path, overrides: Sequence[str]
) -> Component:
    role = cluster.role_of(name)
    return Component(
        name,
        component_argv(role, path, name, overrides),
        health(cluster, name),
        stage=1 if name == GATEWAY else 0,
        needed_group=role if role in needed_roles(cluster) else None,
    )


def needed_roles(cluster: ClusterConfig) -> tuple[str, ...]:
    """The roles the cluster serves nothing without, once every component of one is given up
    on: the gateway, decode, and prefill unless the nodes are colocated (transfer.backend none)
    or the gateway lets decode nodes prefill while no prefill node is ready
    (gateway.prefill_fallback, on by default).

    NOTE: a decode node's local_prefill_threshold alone does not make prefill nodes optional:
    without the fallback the gateway pairs every request with a prefill instance."""
    if cluster.transfer.backend == NO_TRANSFER or cluster.gateway.prefill_fallback:
        return ("gateway", "decode")
    return ("gateway", "decode", "prefill")


def component_argv(role: str, path: Path, name: str, overrides: Sequence[str]) -> tuple[str, ...]:
    sets = [arg for text in overrides for arg in ("--set", text)]
    command = ("-m", "cluster.cli", role, "--config", str(path), "--name", name)
    return (sys.executable, *command, *sets)


def health(cluster: ClusterConfig, name: str) -> str:
    host, port = cluster.address_of(name)
    return f"{http_url(ANY_ADDRESS.get(host, host), port)}/health"


def check_can_listen(cluster: ClusterConfig) -> None:
    """Every host is this machine's and every port is free: fail before starting anything."""
    for label, host, port in listeners(cluster):
        try:
            try_bind(host, port)
        except OSError as exc:
            raise ConfigError(f"{label}: {bind_problem(exc, host, port)}") from None


def check_kv_memory(cluster: ClusterConfig) -> None:
    """The KV pools that CPU nodes size from `mem_fraction` fit this machine together.

    Every rank process takes its fraction of the memory free when it starts, and the launcher
    starts them all at once on one machine: fractions over the whole of it would be killed by
    the kernel (OOM), over and over, under the restart budget."""
    shares = []
    for node in (*cluster.prefill, *cluster.decode):
        engine = node.engine
        if not engine.device.startswith("cuda") and engine.max_total_tokens is None:
            shares += [engine.cache.mem_fraction] * ranks_here(engine)
    if sum(shares) <= MAX_CPU_KV_SHARE:
        return
    most = MAX_CPU_KV_SHARE / len(shares)
    raise ConfigError(
        f"engine.mem_fraction: the {len(shares)} CPU rank processes this launch starts would "
        "each take their engine.mem_fraction of this machine's free memory for a KV pool, "
        f"{sum(shares):.2f}x that memory together; set engine.mem_fraction to at most "
        f"{most:.3f} (or engine.max_total_tokens) on every node"
    )


def try_bind(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # NOTE: as the servers bind (SO_REUSEADDR), so a port in TIME_WAIT does not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


def bind_problem(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"{host}:{port} is already in use (stop what holds it, or move it with --set)"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return (
            f"{host} is not an address of this machine, and `pdserve launch` starts every "
            "component here; on a multi-host cluster run `pdserve prefill|decode|gateway "
            "--config CONFIG --name NAME` on each host"
        )
    return f"cannot listen on {host}:{port} ({exc})"
