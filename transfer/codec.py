"""Typed messages on a socket: frozen dataclasses packed with msgpack as `[type name, fields...]`.

One codec for every socket of ours that carries messages (the prefill/decode control plane, a
node's HTTP and scheduler processes). Nothing is pickled: only the registered types decode, and
an unknown name, a wrong field count or a malformed frame is an error, never a guess.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any

import msgpack


class MessageCodec:
    """Encodes and decodes instances of the registered dataclasses.

    Field values must be msgpack natives (int, float, str, bytes, bool, None, lists/tuples, dicts).
    `use_list=False` decodes arrays as tuples (for frozen messages with tuple fields).
    """

    def __init__(
        self,
        types: Iterable[type],
        *,
        error: type[Exception] = ValueError,
        use_list: bool = True,
    ) -> None:
        self.types = {cls.__name__: cls for cls in types}
        self.error = error
        self.use_list = use_list
        self._arity = {name: len(fields(cls)) for name, cls in self.types.items()}

    def encode(self, msg: Any) -> bytes:
        name = type(msg).__name__
        if self.types.get(name) is not type(msg):
            raise TypeError(f"{name} is not a registered message ({', '.join(self.types)})")
        values = [getattr(msg, f.name) for f in fields(msg)]
        return msgpack.packb([name, *values], use_bin_type=True)

    def decode(self, data: bytes) -> Any:
        try:
            name, *values = msgpack.unpackb(
                data, raw=False, use_list=self.use_list, strict_map_key=False
            )
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise self.error(f"malformed message ({exc!r}): {data[:64]!r}") from None
        cls = self.types.get(name) if isinstance(name, str) else None
        if cls is None:
            raise self.error(f"unknown message type {name!r}")
        if len(values) != self._arity[name]:
            raise self.error(f"{name} carries {len(values)} fields, expected {self._arity[name]}")
        try:
            return cls(*values)
        except (TypeError, ValueError) as exc:
            raise self.error(f"bad {name}: {exc}") from None
