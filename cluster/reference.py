"""docs/CONFIG.md, written from the settings types themselves (their fields, defaults and help).

    python -m cluster.reference > docs/CONFIG.md

Nobody keeps a copy of an option list: a test regenerates this page and compares, so a field
added without its help text, or a page left stale, fails the suite.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from api.settings import GatewaySettings
from engine.layers.attention import ATTENTION_BACKENDS
from engine.options import EngineOptions
from gateway.policies import POLICIES
from modelgen.spec import MakeSpec
from node.settings import NodeSettings
from transfer import served_backends
from transfer.config import TransferConfig

from .k8s.settings import K8sSettings
from .launch_settings import LaunchSettings
from .spec import DecodeSpec, ModelSpec, PrefillSpec

HEADER = """# Configuration reference

Written by `python -m cluster.reference > docs/CONFIG.md` from the settings types (do not edit by
hand). A cluster YAML has the sections below; `--set KEY=VALUE` changes any key
(`prefill.0.engine.page_size=32`), and the node and gateway commands take the same options as
flags (`--engine-opt KEY=VALUE`, `--opt KEY=VALUE`). Invalid values fail when the config loads,
naming the key and the fix; `pdserve launch CONFIG --dry-run` checks a config without starting
anything.
"""

# (heading, what it is, the type, fields that are not keys of that section)
SECTIONS: tuple[tuple[str, str, type, tuple[str, ...]], ...] = (
    ("model", "the checkpoint every node serves", ModelSpec, ()),
    (
        "model.make",
        "a tiny random-weight checkpoint, generated once into `$PDSERVE_CACHE` (default "
        "`~/.cache/pdserve/models`); the `pdserve make-model` flags",
        MakeSpec,
        (),
    ),
    (
        "engine",
        "engine options: `engine:` at the top (every node) and in a node's entry (that node, "
        "key by key over the top); also `--engine-opt KEY=VALUE` and `LLM(model, KEY=VALUE)`",
        EngineOptions,
        (),
    ),
    (
        "transfer",
        "how KV pages move between prefill and decode (every node)",
        TransferConfig,
        ("host", "bootstrap_port"),
    ),
    ("gateway", "the gateway", GatewaySettings, ("prefill", "decode")),
    (
        "launch",
        "how `pdserve launch` supervises the components: a component that exits is restarted "
        "with backoff while the others serve; `--timeout` and `--grace` override two keys",
        LaunchSettings,
        (),
    ),
    (
        "k8s",
        "how `pdserve k8s` renders the cluster for Kubernetes (docs/DEPLOY.md); `--image`, "
        "`--namespace` and `--lws` set three keys",
        K8sSettings,
        (),
    ),
    ("prefill[]", "prefill nodes, a list of entries", PrefillSpec, ()),
    ("decode[]", "decode nodes, a list of entries (at least one)", DecodeSpec, ()),
)
NODE_FIELDS = {f.name: f for f in dataclasses.fields(NodeSettings)}
# Choices that registries hold (a field's own metadata["choices"] is read too).
REGISTERED: dict[tuple[type, str], Any] = {
    (EngineOptions, "attention_backend"): ATTENTION_BACKENDS,
    (TransferConfig, "backend"): served_backends(),
    (GatewaySettings, "prefill_policy"): POLICIES,
    (GatewaySettings, "decode_policy"): POLICIES,
}


def render() -> str:
    parts = [HEADER, "Top level: `served_model_name` (default: the checkpoint directory's name)."]
    for heading, what, cls, skip in SECTIONS:
        parts.append(f"\n## `{heading}`\n\n{what[0].upper()}{what[1:]}.\n")
        parts.append("| key | default | what |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                parts.append(row(f, REGISTERED.get((cls, f.name))))
    return "\n".join(parts) + "\n"


def row(f: dataclasses.Field[Any], registered: Any = None) -> str:
    """A table row; a node entry's NodeSettings fields take their help and default from there."""
    source = f
    if "help" not in f.metadata and f.name in NODE_FIELDS:
        source = NODE_FIELDS[f.name]
    if "help" not in source.metadata:
        raise ValueError(f"{f.name}: a settings field without help (add metadata={{'help': ...}})")
    what = source.metadata["help"]
    choices = registered or source.metadata.get("choices")
    if choices:
        what += f" ({', '.join(f'`{c}`' for c in choices)})"
    return f"| `{f.name}` | {default_of(source)} | {what} |"


def default_of(f: dataclasses.Field[Any]) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return f"see `{f.name}`"
    if f.default is dataclasses.MISSING:
        return "required"
    if f.default is None or f.default == ():
        return ""
    return f"`{json.dumps(f.default)}`"  # YAML spells values as JSON does


if __name__ == "__main__":
    sys.stdout.write(render())
