"""`pdserve k8s CONFIG --out DIR`: argument wiring; the work is in render.py."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..commands import add_set


def add_k8s(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "k8s", help="render a cluster config as Kubernetes objects (a kustomize directory)"
    )
    p.add_argument(
        "config", nargs="?", help="YAML file or shipped config name (default: local-cpu)"
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the directory to write")
    p.add_argument("--image", help="the container image (k8s.image; default pdserve:latest)")
    p.add_argument("--namespace", help="the namespace (k8s.namespace; default default)")
    p.add_argument(
        "--lws", action="store_true",
        help="render rank groups that span hosts as LeaderWorkerSets (k8s.multi_host=true)",
    )  # fmt: skip
    add_set(p)
    p.set_defaults(func=run_k8s)


def run_k8s(args: argparse.Namespace) -> int:
    from .render import render

    written = render(args.config, args.set, args.out, flags_of(args))
    print(f"wrote {len(written)} files to {args.out}; apply them with: kubectl apply -k {args.out}")
    return 0


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    """The k8s keys the flags set (over the config and --set)."""
    flags: dict[str, Any] = {"image": args.image, "namespace": args.namespace}
    flags = {k: v for k, v in flags.items() if v is not None}
    if args.lws:
        flags["multi_host"] = True
    return flags
