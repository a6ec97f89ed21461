"""What a node's HTTP handlers share: its settings, the scheduler client, the tokenizer, the
drain."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerFast

from api.chat import chat_prompt_ids
from node.channel import SchedulerClient
from node.drain import Drain
from node.metrics import NodeMetrics
from node.settings import NodeSettings


@dataclass
class NodeContext:
    settings: NodeSettings
    client: SchedulerClient
    tokenizer: PreTrainedTokenizerFast
    max_model_len: int
    alive: Callable[[], bool]
    drain: Drain
    request_timeout_s: float = 600.0
    metrics: NodeMetrics = field(default_factory=NodeMetrics)

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
