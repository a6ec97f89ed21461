"""The gateway's settings and the roles of the nodes it pairs, as frozen dataclasses.

The cluster YAML (cluster/config.py) and the gateway's flags both resolve to `GatewaySettings`;
a node's own settings are `node.settings.NodeSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["prefill", "decode"]


def setting(default: Any, help: str) -> Any:
    """A field with its help text (docs/CONFIG.md is written from these)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Instance:
    """A node as the gateway sees it."""

    url: str  # http://host:port
    bootstrap_port: int | None = None  # prefill instances


@dataclass(frozen=True)
class GatewaySettings:
    """The gateway: where it listens, the instances it pairs, its policies and limits."""

    host: str = setting("127.0.0.1", "where the OpenAI API listens")
    port: int = setting(30000, "its port")
    prefill: tuple[Instance, ...] = setting((), "prefill instances (from the nodes' entries)")
    decode: tuple[Instance, ...] = setting((), "decode instances (from the nodes' entries)")
    prefill_policy: str = setting("cache_aware", "how a prefill instance is picked")
    decode_policy: str = setting("least_load", "how a decode instance is picked")
    api_key: str | None = setting(None, "the clients' key (401 without it)")
    admin_key: str | None = setting(
        None, "the admin routes' key (/workers; 401 without it, 403 when unset)"
    )
    max_body_bytes: int = setting(8 * 1024 * 1024, "request body limit (413 above)")
    max_prompt_tokens: int | None = setting(None, "prompt length limit (400 above)")
    max_tokens_limit: int | None = setting(
        None,
        "max_tokens limit (400 above); a request without max_tokens gets at most this many tokens",
    )
    max_grammar_bytes: int = setting(
        65536,
        "size limit of a request's constraint: response_format, json_schema, regex, ebnf, tools",
    )
    max_sequences: int = setting(256, "sequences one request may ask for: prompts x n (400 above)")
    max_inflight: int = setting(1024, "requests in flight at once (429 above)")
    request_timeout_s: float = setting(600.0, "a node's answer may take this long")
    health_interval_s: float = setting(1.0, "each instance's /health is checked this often")
    health_timeout_s: float = setting(1.5, "a check that gets no answer this fast fails")
    health_failures: int = setting(
        2, "consecutive failed checks that take an instance out (a draining one is out at once)"
    )
    breaker_errors: int = setting(5, "consecutive request errors that open an instance's breaker")
    breaker_cooldown_s: float = setting(10.0, "an open breaker lets a request through after this")
    max_retries: int = setting(2, "more attempts on other pairs while nothing reached the client")
    prefill_fallback: bool = setting(
        True,
        "PD mode: while no prefill instance can take requests (all unhealthy, circuit-open or "
        "removed), decode instances prefill them themselves (slower first tokens, no 503s)",
    )
    max_migrations: int = setting(
        3,
        "times a stream may move to another pair after its decode node failed mid-stream "
        "(0: the stream ends in an error event instead)",
    )
    first_token_timeout_s: float = setting(
        60.0, "a stream whose first event takes longer fails its pair (and is retried)"
    )
    token_timeout_s: float = setting(
        20.0, "a stream silent this long between events fails its pair (and moves on)"
    )
    tokenizer: str | None = setting(
        None, "a checkpoint dir, for prompt limits and cache_aware (default: the model's)"
    )
    cache_threshold: float = setting(
        0.5,
        "cache_aware: the instance whose seen prompts share the longest prefix gets the request "
        "when that covers more than this share of it, unless loads are out of balance",
    )
    balance_abs_threshold: int = setting(32, "cache_aware: out of balance when max - min > this")
    balance_rel_threshold: float = setting(1.5, "... and max > min * this (least load then)")
    cache_max_chars: int = setting(1 << 22, "cache_aware: text kept per instance (LRU evicted)")
    drain_timeout_s: float = setting(
        30.0,
        "on SIGTERM the gateway stops accepting connections and lets the responses it is "
        "sending finish for up to this long",
    )
    log_level: str = setting("warning", "debug, info, warning or error")
    log_stats_interval_s: float = setting(
        10.0,
        "while requests come or are in flight, the gateway logs a `stats role=gateway "
        "requests_s=... in_flight=...` line this often (at INFO: shown with log_level info or "
        "debug; 0: never)",
    )

    def __post_init__(self) -> None:
        check_log_level(self.log_level)
        if self.log_stats_interval_s < 0:
            raise ValueError(
                f"log_stats_interval_s must be >= 0, got {self.log_stats_interval_s} (0: no "
                "stats lines)"
            )
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {self.max_migrations}")
        for name in ("first_token_timeout_s", "token_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")


LOG_LEVELS = ("debug", "info", "warning", "error")


def check_log_level(level: str) -> None:
    """ValueError (naming the field) unless `level` is one the components' logging takes."""
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log_level {level!r} is unknown (use one of {', '.join(LOG_LEVELS)})")
