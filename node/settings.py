"""What one prefill or decode node runs with: a frozen dataclass the cluster YAML and the node
flags both resolve to. Engine and transfer options are their packages' own types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from api.settings import Role, check_log_level, setting
from engine.options import EngineOptions
from node.reasoning import REASONING_PARSERS
from node.tool_parsers import TOOL_PARSERS
from transfer.config import TransferConfig


@dataclass(frozen=True)
class NodeSettings:
    """One node: HTTP server + scheduler process (+ the prefill's bootstrap server).

    `transfer.host` and `transfer.bootstrap_port` are where the transfer engine and (prefill)
    the bootstrap server listen; the cluster config fills them from the node's `host` and
    `bootstrap_port`.
    """

    role: Role
    model: str
    name: str = "node"
    host: str = setting("127.0.0.1", "where the node's HTTP API listens")
    port: int = setting(30001, "its port")
    served_model_name: str | None = setting(None, "the model id clients use (default: dir name)")
    engine: EngineOptions = field(default_factory=EngineOptions)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    local_prefill_threshold: int = setting(
        0,
        "decode: prefill here (no transfer) when the prompt's uncached part is shorter than "
        "this many tokens (0: always disaggregate when asked to)",
    )
    decode_headroom_tokens: int = setting(
        64, "decode: tokens reserved beyond the prompt before any transfer"
    )
    prealloc_timeout_s: float = setting(
        300.0, "decode: a request waits this long for free KV pages (503 after)"
    )
    drain_timeout_s: float = setting(
        30.0,
        "on SIGTERM the node refuses new requests and finishes its own for up to this long; "
        "what is left then ends with a `draining` error",
    )
    log_level: str = setting("warning", "debug, info, warning or error")
    log_stats_interval_s: float = setting(
        10.0,
        "while the node has work, its scheduler logs a `stats role=... running=... "
        "gen_tok_s=...` line this often (at INFO: shown with log_level info or debug; 0: never)",
    )
    reasoning_parser: str | None = setting(
        None,
        "split a thinking model's <think>...</think> into reasoning_content: deepseek-r1 (the "
        "output starts inside the thinking) or qwen3 (when the output opens with <think>); "
        "a request turns it off with separate_reasoning: false",
    )

    tool_call_parser: str | None = setting(
        None,
        "the format the model writes tool calls in: hermes (Qwen, Hermes), llama3 or "
        "deepseek-v3 (default: the one its chat template writes, else hermes)",
    )

    def __post_init__(self) -> None:
        check_node_choices(self.log_level, self.reasoning_parser, self.tool_call_parser)
        check_log_stats_interval(self.log_stats_interval_s)
        if self.drain_timeout_s < 0:
            raise ValueError(
                f"drain_timeout_s must be >= 0, got {self.drain_timeout_s} (0: end what is in "
                "flight at once)"
            )

    @property
    def model_name(self) -> str:
        """The model id clients and peers see: served_model_name, else the checkpoint dir name."""
        return self.served_model_name or Path(self.model).name


def check_node_choices(
    log_level: str | None, reasoning_parser: str | None, tool_call_parser: str | None
) -> None:
    """ValueError (naming the field) for a choice no node takes; None: the default."""
    if log_level is not None:
        check_log_level(log_level)
    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(
            f"tool_call_parser {tool_call_parser!r} is unknown (use one of "
            f"{', '.join(TOOL_PARSERS)})"
        )
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(
            f"reasoning_parser {reasoning_parser!r} is unknown (use one of "
            f"{', '.join(REASONING_PARSERS)})"
        )


def check_log_stats_interval(interval_s: float | None) -> None:
    """ValueError (naming the field) for a negative interval; None: the default."""
    if interval_s is not None and interval_s < 0:
        raise ValueError(f"log_stats_interval_s must be >= 0, got {interval_s} (0: no stats lines)")
