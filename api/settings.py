"""Settings of one running component (node or gateway), as plain frozen dataclasses.

The cluster YAML (cluster/config.py) and the command line both resolve to these; the node and
gateway entry points take nothing else. `engine` holds engine keyword options by the names
`engine.llm.engine_config` accepts (dtype, page_size, max_total_tokens, mem_fraction,
enable_prefix_cache, max_running, max_batch_tokens, chunk_size, max_model_len, seed,
attention_backend, device).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class TransferSettings:
    """KV transfer options; the names are transfer.TransferConfig's (the node adds host/port)."""

    backend: Literal["mooncake", "nixl", "none"] = "mooncake"  # none: colocated only
    protocol: str = "tcp"  # mooncake: tcp | rdma
    bootstrap_timeout_s: float = 30.0  # a room waits this long for its peer to show up
    waiting_timeout_s: float = 300.0  # ... for the prefill to produce the KV
    transfer_timeout_s: float = 60.0  # ... for the write to finish
    abort_timeout_s: float = 10.0  # ... for prefill to confirm it stopped writing an aborted room
    quarantine_s: float = 30.0  # decode holds an unconfirmed failed room's pages this long
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 6.0
    # testing only: the prefill node fails this fraction of rooms on purpose instead of sending
    # their KV (through the real failure path: both sides free the room's pages once)
    fault_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fault_fraction <= 1.0:
            raise ValueError(
                f"transfer.fault_fraction must be between 0 and 1 (the fraction of rooms to "
                f"fail on purpose), got {self.fault_fraction}"
            )

    def config_options(self) -> dict[str, Any]:
        """The keyword arguments of transfer.TransferConfig: every field but the fault knob."""
        options = asdict(self)
        del options["fault_fraction"]
        return options


@dataclass(frozen=True)
class NodeSettings:
    """One prefill or decode node: HTTP server + scheduler process (+ bootstrap server)."""

    role: Role
    model: str
    name: str = "node"
    host: str = "127.0.0.1"
    port: int = 30001
    bootstrap_port: int | None = None  # prefill only; the port SGLang's router is told
    served_model_name: str | None = None  # the `model` id clients use (default: dir name)
    engine: dict[str, Any] = field(default_factory=dict)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    # decode only: prefill locally when no bootstrap fields arrive, or when the uncached part of
    # the prompt is shorter than this many tokens (0: always disaggregate when asked to)
    local_prefill_threshold: int = 0
    decode_headroom_tokens: int = 64  # pages reserved beyond the prompt before any transfer
    prealloc_timeout_s: float = 300.0  # a decode request waits this long for free pages
    log_level: str = "warning"

    @property
    def model_name(self) -> str:
        """The model id clients and peers see: served_model_name, else the checkpoint dir name."""
        return self.served_model_name or Path(self.model).name


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
