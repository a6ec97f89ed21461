"""Structured, quiet logs: `event key=value ...` lines, the request id in each request's lines."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("pdserve.gateway")


def log_event(level: int, event: str, rid: str | None = None, **fields: Any) -> None:
    if not log.isEnabledFor(level):
        return
    parts = [event] + ([f"rid={rid}"] if rid is not None else [])
    parts += [f"{k}={v}" for k, v in fields.items()]
    log.log(level, " ".join(parts))
