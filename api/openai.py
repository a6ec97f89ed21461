"""OpenAI-compatible request models, shared by the gateway and the nodes (the responses are
openai_responses.py's).

Requests keep fields they do not name (`extra="allow"`): SGLang's extensions (`top_k`, `min_p`,
`repetition_penalty`, `regex`, ...) and the PD fields (`bootstrap_*`, `rid`) travel through
untouched; the boolean ones are declared, so that they are as strict as OpenAI's own (`"yes"` is
not true). `parse_request` validates a JSON body into a model and turns pydantic's errors into a
400 in OpenAI's shape, naming the offending field. vLLM's `prompt_logprobs` is declared too,
and with completions' `echo` and `logprobs` says how much of the prompt's logprobs a request
needs (`prompt_top`); so are vLLM's chat-template fields (`add_generation_prompt`,
`continue_final_message`, `chat_template_kwargs`: `template_options`) and its
`stream_options.continuous_usage_stats`.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .chat import TemplateOptions
from .errors import ApiError, invalid_request, not_found

Stop = str | list[str] | None
# a boolean that defaults to false, where OpenAI's schema (and vLLM) also take null for it
FalseOrNull = Annotated[
    StrictBool, BeforeValidator(lambda value: False if value is None else value)
]
TrueOrNull = Annotated[StrictBool, BeforeValidator(lambda value: True if value is None else value)]
# transformers' apply_chat_template arguments: chat_template_kwargs holds the template's own
# variables only (the encoder, api/chat.py, sets these; a request sets two as fields of its own)
RENDERER_ARGUMENTS = (
    "conversation",
    "messages",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "sanitize_control_tokens",
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
)
Prompt = str | list[str] | list[int] | list[list[int]]
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: a bias is in [-100, 100]
MAX_LOGPROBS = 20  # best tokens per position at most (OpenAI's; vLLM's default max_logprobs)

# pdserve's own body field: the gateway's max_tokens_limit, told to the nodes so that a request
# without max_tokens (max_completion_tokens, /generate's max_new_tokens) gets at most this many
MAX_TOKENS_LIMIT = "pd_max_tokens_limit"


def max_tokens_limit(body: dict[str, Any]) -> int | None:
    """The body's `pd_max_tokens_limit`; a 400 unless absent or an integer >= 1."""
    value = body.get(MAX_TOKENS_LIMIT)
    if value is not None and (type(value) is not int or value < 1):
        raise invalid_request(
            f"{MAX_TOKENS_LIMIT} must be an integer >= 1 (got {value!r:.40})",
            param=MAX_TOKENS_LIMIT,
        )
    return value


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: FalseOrNull = False
    continuous_usage_stats: FalseOrNull = False


class _SamplingRequest(_Open):
    """What completions and chat completions share."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stream: FalseOrNull = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # SGLang / vLLM extensions that are booleans (the others travel as extra fields)
    ignore_eos: StrictBool | None = None
    skip_special_tokens: StrictBool | None = None
    include_stop_str_in_output: StrictBool | None = None
    # vLLM's: the prompt's own logprobs, with this many best tokens per position
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_ids_and_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f'keys must be token ids such as "50256", not {key!r:.40}')
            if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], not {value}")
        return bias

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: Stop) -> Stop:
        if isinstance(stop, list) and any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_not_streamed(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and info.data.get("stream"):
            raise ValueError("prompt_logprobs are not available when stream is true (as in vLLM)")
        return top

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _at_least_one_token(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be >= 1 (ask for at least one token)")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats (with include_usage): every chunk says its choice's
        usage so far."""
        options = self.stream_options
        return bool(options and options.include_usage and options.continuous_usage_stats)

    @property
    def answered_prompt_logprobs(self) -> int | None:
        """`prompt_logprobs` as the answer carries it: not in a stream (vLLM takes 0 there, and
        sends nothing)."""
        return None if self.stream else self.prompt_logprobs

    @property
    def prompt_top(self) -> int | None:
        """How many best tokens each prompt position needs, or None: no prompt logprobs."""
        return self.answered_prompt_logprobs


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    # NOTE: None when omitted (it is 16 then, at most the rest of the context): an explicit
    # value that does not fit beside the prompt is a 400 instead
    max_tokens: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: FalseOrNull = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix is not None:
            raise ValueError("suffix is not supported (leave it out)")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        # NOTE: best_of > n would rank candidates by their logprobs, which this server does not
        n = info.data.get("n", 1)
        if best_of is not None and best_of != n:
            raise ValueError(
                f"best_of must equal n ({n}) or be left out (returning the best of more "
                "candidates than n is not supported)"
            )
        return best_of

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Prompt) -> Prompt:
        if isinstance(prompt, list) and (not prompt or any(p == [] or p == "" for p in prompt)):
            raise ValueError("prompt must not be empty (send a string or a non-empty list)")
        return prompt

    @property
    def echo_logprobs(self) -> bool:
        """Whether the logprobs cover the echoed prompt's tokens too (lm-eval's loglikelihood)."""
        return self.echo and self.logprobs is not None

    @property
    def answered_prompt_logprobs(self) -> int | None:
        """vLLM's rule: echo's logprobs stand for an omitted prompt_logprobs (not in a stream)."""
        if self.stream:
            return None
        return self.logprobs if self.prompt_logprobs is None and self.echo else self.prompt_logprobs

    @property
    def prompt_top(self) -> int | None:
        asked = [self.answered_prompt_logprobs, self.logprobs if self.echo else None]
        return max((k for k in asked if k is not None), default=None)

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch: one for a string or a token-id list."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class ContentPart(_Open):
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(_Open):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: dict[str, str]


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        # NOTE: before the union's own validation, whose first complaint would be "not a string"
        for i, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(
                    f"part {i} is of type {kind!r}, but this model takes text only (send the "
                    "content as text)"
                )
        return content

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            also = " or tool_calls" if self.role == "assistant" else ""
            raise ValueError(f"a message of role {self.role!r} needs content{also}")
        return self

    @property
    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: FalseOrNull = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM's: how the chat template renders the messages (api/chat.py's TemplateOptions)
    add_generation_prompt: TrueOrNull = True
    continue_final_message: FalseOrNull = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("continue_final_message")
    @classmethod
    def _continue_without_generation_prompt(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be true (send "
                "add_generation_prompt: false to have the model go on with the last message)"
            )
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = [k for k in RENDERER_ARGUMENTS if k in (kwargs or {})]
        if taken:
            raise ValueError(
                f"{taken[0]!r} cannot be set here (chat_template_kwargs are the template's own "
                "variables, such as enable_thinking; add_generation_prompt and "
                "continue_final_message are request fields)"
            )
        return kwargs

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return top

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(
        cls, choice: ToolChoice | None, info: ValidationInfo
    ) -> ToolChoice | None:
        tools = info.data.get("tools") or []
        names = [t.function.name for t in tools]
        if choice in ("auto", "required") and not tools:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        if isinstance(choice, NamedToolChoice):
            name = choice.function.get("name")
            if name not in names:
                offered = ", ".join(names) or "none"
                raise ValueError(f"names the function {name!r}, not among the tools ({offered})")
        return choice

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as a chat template takes them: role and text, an assistant's tool calls
        (their arguments as objects, which templates expect), a tool result's call id."""
        out = []
        for m in self.messages:
            # NOTE: an assistant turn of tool calls alone keeps content None (templates test it)
            text = None if m.content is None and m.tool_calls else m.text
            message: dict[str, Any] = {"role": m.role, "content": text}
            if m.tool_calls:
                message["tool_calls"] = [template_call(c) for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
            out.append(message)
        return out

    def template_options(self) -> TemplateOptions:
        return TemplateOptions(
            self.add_generation_prompt, self.continue_final_message, self.chat_template_kwargs or {}
        )

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as a chat template takes them (OpenAI's shape)."""
        if not self.tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def forced_tool(self) -> str | None:
        """The function tool_choice names, if it names one."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.get("name")
        return None

    @property
    def output_limit(self) -> int | None:
        """max_completion_tokens, or the older max_tokens."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def output_limit_name(self) -> str:
        """The field `output_limit` came from (what an error about it names)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


def template_call(call: ToolCall) -> dict[str, Any]:
    try:
        args: Any = json.loads(call.function.arguments)
    except ValueError:
        args = call.function.arguments  # NOTE: the client's text as it came; templates cope
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": args},
    }


# ---- validation ----


def check_model(model: str, served: Collection[str], server: str) -> None:
    """A 404 (OpenAI's model_not_found) for a model `server` ("this node") does not serve."""
    if model not in served:
        names = ", ".join(sorted(served))
        raise not_found(
            f"the model {model!r} does not exist ({server} serves: {names})",
            param="model",
            code="model_not_found",
        )


M = TypeVar("M", bound=BaseModel)


def parse_request(model: type[M], data: Any) -> M:
    """`data` validated as `model`; a 400 `ApiError` naming the first bad field otherwise."""
    if not isinstance(data, dict):
        raise invalid_request(f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    """OpenAI's 400 for the first of pydantic's errors."""
    first = exc.errors(include_url=False)[0]
    param = param_name(first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        return invalid_request(f"you must provide a {param} parameter", param=param)
    if "input" in first and first["type"] != "model_type" and param:
        message = f"{message} (got {first['input']!r:.80})"
    where = f"{param}: " if param else ""
    return invalid_request(f"{where}{message}", param=param or None)


def param_name(loc: tuple[int | str, ...]) -> str:
    """`("messages", 0, "role")` -> `messages[0].role` (pydantic's union tags dropped)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not _is_union_tag(part):
            name += f".{part}" if name else part
    return name


def _is_union_tag(part: str) -> bool:
    return part[:1].islower() and ("[" in part or part in {"str", "int", "float", "bool", "list"})
