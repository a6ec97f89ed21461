"""Checks across a cluster config that types alone cannot express: names, ports, choices."""

from __future__ import annotations

import re
from collections.abc import Iterator

from engine.options import DTYPE_NAMES
from gateway.policies import POLICIES
from transfer import served_backends

from .schema import ConfigError, did_you_mean, hint_for
from .spec import GATEWAY, ClusterConfig, ModelSpec

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # names become log file names
LOOPBACK = {"localhost": "127.0.0.1", "::1": "127.0.0.1"}


def check_cluster(config: ClusterConfig) -> None:
    check_model(config.model)
    if not config.decode:
        raise ConfigError("decode: list at least one decode node (name, host, port)")
    check_names(config)
    check_ports(config)
    check_choices(config)
    check_pairs_agree(config)


def check_model(model: ModelSpec) -> None:
    if (model.path is None) == (model.make is None):
        raise ConfigError(
            "model: give exactly one of path (a checkpoint directory) or make (arguments of a "
            "tiny generated checkpoint, e.g. {arch: qwen3})"
        )


def check_names(config: ClusterConfig) -> None:
    seen: dict[str, str] = {}
    for where, name in node_names(config):
        if not NAME.match(name):
            raise ConfigError(
                f"{where}: {name!r} is not a usable name (letters, digits, '-', '_', '.')"
            )
        if name == GATEWAY:
            raise ConfigError(
                f"{where}: {GATEWAY!r} names the gateway; give this node another name"
            )
        if name in seen:
            raise ConfigError(
                f"{where}: duplicate name {name!r} (also at {seen[name]}); names must be unique"
            )
        seen[name] = where


def node_names(config: ClusterConfig) -> Iterator[tuple[str, str]]:
    for role, nodes in (("prefill", config.prefill), ("decode", config.decode)):
        for i, node in enumerate(nodes):
            yield f"{role}.{i}.name", node.name


def check_ports(config: ClusterConfig) -> None:
    seen: dict[tuple[str, int], str] = {}
    for label, host, port in listeners(config):
        if not 1 <= port <= 65535:
            raise ConfigError(f"{label}: {port} is not a port number (1-65535)")
        key = (LOOPBACK.get(host, host), port)
        if key in seen:
            raise ConfigError(
                f"port clash on {host}:{port}: {seen[key]} and {label} "
                "(give each component on a host its own ports)"
            )
        seen[key] = label


def listeners(config: ClusterConfig) -> Iterator[tuple[str, str, int]]:
    """(label, host, port) of every port a component listens on."""
    yield "gateway port (gateway.port)", config.gateway.host, config.gateway.port
    for i, p in enumerate(config.prefill):
        yield f"prefill {p.name!r} port (prefill.{i}.port)", p.host, p.port
        where = f"prefill.{i}.bootstrap_port"
        yield f"prefill {p.name!r} bootstrap_port ({where})", p.host, p.bootstrap_port
    for i, d in enumerate(config.decode):
        yield f"decode {d.name!r} port (decode.{i}.port)", d.host, d.port


def check_choices(config: ClusterConfig) -> None:
    for key in ("prefill_policy", "decode_policy"):
        check_policy(f"gateway.{key}", getattr(config.gateway, key))
    backend, choices = config.transfer.backend, served_backends()
    if backend not in choices:
        raise ConfigError(
            f"transfer.backend: {backend!r} is not one of {', '.join(choices)}"
            + hint_for(backend, choices)
        )


def check_pairs_agree(config: ClusterConfig) -> None:
    """Every prefill node can write into every decode node: the KV pages' shape must match (the
    transfer layer checks it again when they meet, but a config that cannot work fails here)."""
    if not config.prefill:
        return
    nodes = [*config.prefill, *config.decode]
    for name in ("page_size", "dtype"):
        # NOTE: dtype None is the checkpoint's own, which may or may not match a named one
        values = {n.name: canonical(getattr(n.engine, name)) for n in nodes}
        values = {k: v for k, v in values.items() if v is not None}
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{n!r} {v}" for n, v in values.items())
            raise ConfigError(
                f"engine.{name} differs between nodes ({listed}); prefill writes its KV pages "
                f"into decode's, so set engine.{name} alike on every node"
            )


def canonical(value: object) -> object:
    """One spelling per dtype (bf16 and bfloat16 agree); other values as they are."""
    return DTYPE_NAMES.get(value, value) if isinstance(value, str) else value


def check_policy(where: str, policy: str) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"{where}: unknown policy {policy!r}" + did_you_mean(policy, POLICIES))
