"""What one prefill or decode node runs with: a frozen dataclass the cluster YAML and the node
flags both resolve to. Engine and transfer options are their packages' own types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from api.settings import Role
from engine.options import EngineOptions
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
    host: str = "127.0.0.1"
    port: int = 30001
    served_model_name: str | None = None  # the `model` id clients use (default: dir name)
    engine: EngineOptions = field(default_factory=EngineOptions)
    transfer: TransferConfig = field(default_factory=TransferConfig)
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
