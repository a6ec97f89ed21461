"""The gateway's settings and the roles of the nodes it pairs, as frozen dataclasses.

The cluster YAML (cluster/config.py) and the gateway's flags both resolve to `GatewaySettings`;
a node's own settings are `node.settings.NodeSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class Instance:
    """A node as the gateway sees it."""

    url: str  # http://host:port
    bootstrap_port: int | None = None  # prefill instances


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 30000
    prefill: tuple[Instance, ...] = ()
    decode: tuple[Instance, ...] = ()
    prefill_policy: str = "cache_aware"
    decode_policy: str = "least_load"
    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    max_inflight: int = 1024
    request_timeout_s: float = 600.0
    health_interval_s: float = 5.0
    health_failures: int = 3  # consecutive failed checks before an instance is taken out
    breaker_errors: int = 5  # consecutive request errors that open an instance's breaker
    breaker_cooldown_s: float = 10.0
    max_retries: int = 2
    tokenizer: str | None = None  # a checkpoint dir, for prompt-length limits and cache_aware
    # cache_aware: send a prompt to the instance whose seen prompts share the longest prefix with
    # it when that covers more than cache_threshold of it, unless the loads are out of balance
    # (max - min > balance_abs_threshold and max > min * balance_rel_threshold: least load then)
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    cache_max_chars: int = 1 << 22  # per instance prefix tree; least recently used text evicted
    log_level: str = "warning"
