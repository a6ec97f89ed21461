"""What a node's HTTP handlers share: its settings, the scheduler client, the tokenizer, the
drain."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerFast

from api.chat import DEFAULT_OPTIONS, TemplateOptions, chat_prompt_ids
from engine.stop import replay_text
from engine.tokenizer import IncrementalDetokenizer
from node.channel import SchedulerClient
from node.drain import Drain
from node.messages import GenerateRequest, TokenOutput
from node.metrics import NodeMetrics
from node.settings import NodeSettings
from node.tools import parser_for

MAX_BODY_BYTES = 64 * 1024 * 1024  # a request's body (the gateway's own limit is lower)


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

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        options: TemplateOptions = DEFAULT_OPTIONS,
    ) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, tools, options)

    @property
    def tool_parser(self) -> str:
        """The format this model writes tool calls in (node/tools.py)."""
        return parser_for(self.tokenizer.chat_template, self.settings.tool_call_parser)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def resumed_output(self, req: GenerateRequest) -> TokenOutput:
        """A resumed request's output as its stream showed it before it moved here (the engine
        replays it alike), so whole answers and cumulative streams include it."""
        ids = req.prompt_ids[len(req.prompt_ids) - req.num_resumed :]
        skip = req.params.get("skip_special_tokens", True)
        stop = req.params.get("stop") or []
        stops = [stop] if isinstance(stop, str) else list(stop)
        detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=bool(skip))
        _, shown = replay_text(detokenizer, ids, stops)
        return TokenOutput(req.rid, token_ids=list(ids), text=shown, completion_tokens=len(ids))
