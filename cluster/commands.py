"""`pdserve launch|prefill|decode|gateway`: argument wiring; the work is in config and launch.

A component starts from a cluster config (`--config CONFIG --name NAME [--set k=v ...]`, what
`pdserve launch` runs on each component) or from flags alone (`--model DIR --port P ...`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.settings import GatewaySettings, Instance
from engine.options import EngineOptions
from gateway.policies import POLICIES
from node.settings import NodeSettings
from transfer import served_backends

from .config import load_cluster, resolve_config_path
from .overrides import parse_assignment
from .schema import ConfigError, build
from .spec import GATEWAY
from .validate import check_policy

if TYPE_CHECKING:
    from node.loop import NodeLoop

FROM_CONFIG = "from a cluster config"


def add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="start every component of a cluster config on this machine")
    p.add_argument(
        "config", nargs="?", help="YAML file or shipped config name (default: local-cpu)"
    )
    add_set(p)
    p.add_argument("--log-dir", type=Path, help="write NAME.log files here instead of stderr")
    p.add_argument(
        "--timeout", type=float,
        help="seconds to wait for every component to be healthy (default: the config's "
        "launch.health_timeout_s, 600)",
    )  # fmt: skip
    p.add_argument(
        "--grace", type=float,
        help="seconds between SIGTERM and SIGKILL when stopping, for the gateway and then for "
        "the nodes (default: the config's launch.grace_s, 45)",
    )  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true",
        help="check the config and print each component's command; start nothing",
    )  # fmt: skip
    p.set_defaults(func=run_launch)


def run_launch(args: argparse.Namespace) -> int:
    from .launch import dry_run, launch

    if args.dry_run:
        return dry_run(args.config, args.set)
    return launch(
        args.config, args.set, log_dir=args.log_dir, timeout_s=args.timeout, grace_s=args.grace
    )


def add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. gateway.port=31000 or prefill.0.engine.page_size=32",
    )  # fmt: skip


def add_config_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(FROM_CONFIG)
    group.add_argument("--config", help="cluster YAML file (or a shipped config name)")
    group.add_argument("--name", help="the component's name in the config")
    add_set(group)  # type: ignore[arg-type]


PARALLEL_FLAGS = ("tp_size", "ep_size", "dp_attention", "nnodes", "node_rank", "dist_init_addr")


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """SGLang's names for a rank group; with --config they override the instance's engine."""
    group = p.add_argument_group("parallelism (engine options)")
    group.add_argument("--tp-size", type=int, help="tensor-parallel ranks of the model")
    group.add_argument("--ep-size", type=int, help="expert parallelism: 1 or the tp size")
    group.add_argument(
        "--dp-attention", action="store_true", default=None,
        help="DP attention: each rank serves its own requests (MLA models; ep size = tp size)",
    )  # fmt: skip
    group.add_argument("--nnodes", type=int, help="hosts the rank group spans")
    group.add_argument(
        "--node-rank", type=int,
        help="this host's place among --nnodes (not 0: runs only its ranks, no API)",
    )  # fmt: skip
    group.add_argument("--dist-init-addr", help="host:port of node rank 0's rendezvous")


def parallel_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parallel flags given, as engine options."""
    return {k: getattr(args, k) for k in PARALLEL_FLAGS if getattr(args, k, None) is not None}


def add_node(sub: argparse._SubParsersAction, role: str) -> None:
    p = sub.add_parser(role, help=f"run one {role} node")
    add_config_flags(p)
    add_parallel_flags(p)
    flags = p.add_argument_group("without a config")
    flags.add_argument("--model", help="checkpoint directory")
    flags.add_argument("--host", default="127.0.0.1")
    flags.add_argument("--port", type=int)
    if role == "prefill":
        flags.add_argument("--bootstrap-port", type=int, help="KV bootstrap server port")
    else:
        flags.add_argument("--local-prefill-threshold", type=int, default=0)
    flags.add_argument("--served-model-name")
    flags.add_argument(
        "--engine-opt", action="append", default=[], metavar="KEY=VALUE",
        help=f"an engine option ({', '.join(f.name for f in dataclasses.fields(EngineOptions))})",
    )  # fmt: skip
    flags.add_argument("--transfer-backend", choices=served_backends(), default="mooncake")
    flags.add_argument("--transfer-protocol", choices=["tcp", "rdma"], default="tcp")
    p.set_defaults(func=run_node, role=role)


def run_node(args: argparse.Namespace) -> int:
    if not args.config and (parallel_options(args).get("node_rank") or 0) > 0:
        args.port = args.port or 0  # another host of a rank group serves no API
    settings = node_from_config(args) if args.config else node_from_flags(args)
    if parallel := parallel_options(args):
        engine = build(EngineOptions, {**dataclasses.asdict(settings.engine), **parallel}, "")
        settings = dataclasses.replace(settings, engine=engine)
    if settings.engine.node_rank > 0:  # another host of a rank group: its ranks, no API
        from engine.parallel.worker import serve_ranks
        from node.kv_link import rank_setup

        return serve_ranks(settings.model, settings.engine, rank_setup(settings))
    from node.server import serve_node  # NOTE: here: it pulls in torch and the engine

    serve_node(settings, role_loop(settings.role))
    return 0


def role_loop(role: str) -> type[NodeLoop]:
    """The scheduler loop class of a node role."""
    if role == "prefill":
        from prefill.loop import PrefillLoop

        return PrefillLoop
    from decode.loop import DecodeLoop

    return DecodeLoop


def node_from_config(args: argparse.Namespace) -> NodeSettings:
    if args.model is not None or args.port is not None:
        raise ConfigError("--model and --port go without --config (with it, use --set KEY=VALUE)")
    cluster = load_cluster(resolve_config_path(args.config), args.set)
    name = required(args.name, "--name", "with --config")
    role = cluster.role_of(name)
    if role != args.role:
        raise ConfigError(f"{name!r} is a {role} component: start it with `pdserve {role}`")
    cluster.ensure_model()
    return cluster.node_settings(name)


def node_from_flags(args: argparse.Namespace) -> NodeSettings:
    model = required(args.model, "--model", "(or --config CONFIG --name NAME)")
    data: dict[str, Any] = {
        "role": args.role,
        "model": model,
        "name": args.name or f"{args.role}-{args.port}",
        "host": args.host,
        "port": required(args.port, "--port", ""),
        "served_model_name": args.served_model_name,
        "engine": engine_options(args.engine_opt),
        "transfer": {
            "backend": args.transfer_backend,
            "protocol": args.transfer_protocol,
            "host": args.host,
        },
    }
    if args.role == "prefill":
        data["transfer"]["bootstrap_port"] = required(args.bootstrap_port, "--bootstrap-port", "")
    else:
        data["local_prefill_threshold"] = args.local_prefill_threshold
    return build(NodeSettings, data, "")


def engine_options(assignments: list[str]) -> dict[str, Any]:
    """Engine options from `--engine-opt key=value` flags, checked against EngineOptions."""
    data = {}
    for text in assignments:
        keys, value = parse_assignment(text, "--engine-opt")
        data[".".join(keys)] = value
    build(EngineOptions, data, "--engine-opt")
    return data


def add_gateway(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="run the gateway")
    add_config_flags(p)
    flags = p.add_argument_group("without a config")
    flags.add_argument("--prefill", action="append", default=[], metavar="URL[@BOOTSTRAP_PORT]")
    flags.add_argument("--decode", action="append", default=[], metavar="URL")
    flags.add_argument("--host", default="127.0.0.1")
    flags.add_argument("--port", type=int, default=30000)
    flags.add_argument("--prefill-policy", default="cache_aware", choices=list(POLICIES))
    flags.add_argument("--decode-policy", default="least_load", choices=list(POLICIES))
    flags.add_argument("--api-key")
    flags.add_argument("--admin-key")
    flags.add_argument("--tokenizer", help="checkpoint dir, for prompt limits and cache_aware")
    flags.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE",
        help="any other GatewaySettings field, e.g. max_inflight=256",
    )  # fmt: skip
    p.set_defaults(func=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    settings = gateway_from_config(args) if args.config else gateway_from_flags(args)
    from gateway.server import run  # NOTE: here: only the gateway needs uvicorn and httpx

    run(settings)
    return 0


def gateway_from_config(args: argparse.Namespace) -> GatewaySettings:
    cluster = load_cluster(resolve_config_path(args.config), args.set)
    if (args.name or GATEWAY) != GATEWAY:
        raise ConfigError(f"the gateway's name is {GATEWAY!r}, got --name {args.name!r}")
    cluster.ensure_model()  # the gateway reads the tokenizer from the model dir
    return cluster.gateway_settings()


def gateway_from_flags(args: argparse.Namespace) -> GatewaySettings:
    if not args.decode:
        raise ConfigError("give at least one --decode URL (or --config CONFIG)")
    data: dict[str, Any] = {}
    for text in args.opt:
        keys, value = parse_assignment(text, "--opt")
        data[".".join(keys)] = value
    data.update(
        host=args.host, port=args.port, prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy, api_key=args.api_key, admin_key=args.admin_key,
        tokenizer=args.tokenizer,
    )  # fmt: skip
    settings = build(GatewaySettings, data, "--opt", skip=("prefill", "decode"))
    for key in ("prefill_policy", "decode_policy"):
        check_policy(f"--opt {key}", getattr(settings, key))
    prefill = tuple(parse_instance(text, "--prefill") for text in args.prefill)
    decode = tuple(parse_instance(text, "--decode") for text in args.decode)
    return dataclasses.replace(settings, prefill=prefill, decode=decode)


def parse_instance(text: str, flag: str) -> Instance:
    """`http://host:port@8998` -> Instance(url, bootstrap_port=8998); no scheme means http."""
    url, at, port = text.rpartition("@")
    if not at or not port.isdigit():
        url, port = text, ""
    if flag == "--prefill" and not port:
        raise ConfigError(f"{flag} {text!r}: add the bootstrap port, e.g. {text}@8998")
    if flag == "--decode" and port:
        raise ConfigError(f"{flag} {text!r}: decode nodes have no bootstrap port (drop @{port})")
    if "://" not in url:
        url = f"http://{url}"
    return Instance(url.rstrip("/"), int(port) if port else None)


def required(value: Any, flag: str, context: str) -> Any:
    if value is None:
        raise ConfigError(f"{flag} is required {context}".rstrip())
    return value
