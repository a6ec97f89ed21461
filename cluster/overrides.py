"""`dotted.key=value` overrides (`--set`, `--engine-opt`) applied to YAML-shaped data.

Values are parsed as YAML (`32` is an int, `true` a bool, `null` None, `[a, b]` a list); list
items are addressed by index (`prefill.0.port=30011`). Missing mappings on the way are created, so
`prefill.0.engine.page_size=32` works on a node without an `engine` section.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import yaml

from .schema import ConfigError, describe


def parse_assignment(text: str, flag: str = "--set") -> tuple[list[str], Any]:
    """('a.b.c' split into keys, parsed value) from 'a.b.c=value'."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"{flag} expects dotted.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} {text!r}: the value is not valid YAML ({exc})") from None
    return keys, value


def apply_overrides(data: dict[str, Any], assignments: Iterable[str]) -> dict[str, Any]:
    """A copy of `data` with every 'dotted.key=value' assignment applied in order."""
    data = copy.deepcopy(data)
    for text in assignments:
        keys, value = parse_assignment(text)
        set_path(data, keys, value)
    return data


def set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        node = child(node, key, ".".join(keys[: depth + 1]), ".".join(keys[:depth]))
    put(node, keys[-1], value, ".".join(keys[:-1]))


def child(node: Any, key: str, path: str, parent: str) -> Any:
    """The container under `key` (a new mapping where there is none yet)."""
    if isinstance(node, list):
        return node[index(node, key, path, parent)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {path}: {parent} is {describe(node)}, not a mapping or list")
    if node.get(key) is None:
        node[key] = {}
    return node[key]


def put(node: Any, key: str, value: Any, parent: str) -> None:
    path = f"{parent}.{key}" if parent else key
    if isinstance(node, list):
        node[index(node, key, path, parent)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise ConfigError(f"--set {path}: {parent} is {describe(node)}, not a mapping or list")


def index(items: list[Any], key: str, path: str, parent: str) -> int:
    if not key.isdigit():
        raise ConfigError(
            f"--set {path}: {parent} is a list; address its items by index (0, 1, ...)"
        )
    if int(key) >= len(items):
        raise ConfigError(
            f"--set {path}: {parent} has {len(items)} item(s), so index {key} is out of range"
        )
    return int(key)
