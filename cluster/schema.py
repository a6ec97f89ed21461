"""Frozen dataclasses from YAML-shaped data, with errors that name the key, its path and the fix.

`build(cls, data, where)` checks a mapping against the fields and type hints of a dataclass:
unknown keys (with the closest valid key), missing required keys, and wrong types, recursing into
nested dataclasses and `tuple[X, ...]` lists; a ValueError from the dataclass's own checks becomes
a ConfigError at the key its message starts with. It understands the hints our settings use: bool,
int, float, str, `X | None`, `Literal[...]`, `dict[str, Any]`, `Any`, dataclasses and tuples.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A cluster config (or a flag standing in for one) that cannot be used as written."""


def join(where: str, key: str | int) -> str:
    return f"{where}.{key}" if where else str(key)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)', or the list of valid choices when nothing is close."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(choices)})"


def build(cls: type[T], data: Any, where: str, skip: Iterable[str] = ()) -> T:
    """An instance of dataclass `cls` from mapping `data` found at dotted path `where`.

    Fields named in `skip` are not keys of the mapping; they keep their defaults. A field whose
    `metadata["skip"]` names fields of its own dataclass skips those one level down.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'}: expected a mapping, got {describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in set(skip)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            place = f"in {where}" if where else "at the top level"
            raise ConfigError(
                f"{join(where, str(key))}: unknown key {str(key)!r} {place}"
                + did_you_mean(str(key), fields)
            )
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise ConfigError(f"{where or 'the config'}: missing required key {name!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        key: convert(hints[key], value, join(where, key), fields[key].metadata.get("skip", ()))
        for key, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the dataclass's own checks
        raise ConfigError(checked_message(str(exc), where, fields)) from None


def checked_message(message: str, where: str, fields: Iterable[str]) -> str:
    """A settings class's ValueError as a config error at `where`; a message that starts with
    a field name ("page_size must be >= 1, ...") is placed at that key."""
    first, _, rest = message.partition(" ")
    if first in set(fields) and rest:
        return f"{join(where, first)}: {rest}"
    return f"{where or 'the config'}: {message}"


def convert(hint: Any, value: Any, where: str, skip: Iterable[str] = ()) -> Any:
    """`value` checked against type hint `hint` (and built, for dataclasses and tuples; `skip`:
    fields of a dataclass that are not keys here, from the field's `metadata["skip"]`)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        return convert_optional(hint, value, where)
    if origin is Literal:
        return convert_choice(typing.get_args(hint), value, where)
    if origin is tuple:
        return convert_tuple(typing.get_args(hint)[0], value, where)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        # NOTE: an empty YAML section (`engine:` with only comments under it) reads as null.
        return build(hint, {} if value is None else value, where, skip)  # type: ignore[arg-type]
    return convert_scalar(hint, value, where)


def convert_optional(hint: Any, value: Any, where: str) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None and len(args) < len(typing.get_args(hint)):
        return None
    if len(args) != 1:
        raise TypeError(f"{where}: unsupported type hint {hint} (extend cluster/schema.py)")
    return convert(args[0], value, where)


def convert_choice(choices: tuple[Any, ...], value: Any, where: str) -> Any:
    if value in choices:
        return value
    names = [str(c) for c in choices]
    raise ConfigError(
        f"{where}: {value!r} is not one of {', '.join(names)}" + hint_for(value, names)
    )


def hint_for(value: Any, names: list[str]) -> str:
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def convert_tuple(item: Any, value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {describe(value)}")
    return tuple(convert(item, v, join(where, i)) for i, v in enumerate(value))


def convert_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"{where}: unsupported type hint {hint} (extend cluster/schema.py)")
    if not ok:
        quote = " (quote it to make it a string)" if hint is str and value is not None else ""
        raise ConfigError(f"{where}: expected {hint.__name__}, got {describe(value)}{quote}")
    return value


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
