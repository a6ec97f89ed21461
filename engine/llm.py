"""Offline API: `LLM(model_path, **options).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.engine import Engine, RequestOutput
from engine.options import EngineOptions
from engine.prompt_logprobs import PromptLogprobs
from engine.sampling import SamplingParams

Prompt = str | Sequence[int]


@dataclass
class Completion:
    """The finished result of one prompt."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None  # when its params asked for them
    logits: list[torch.Tensor] = field(default_factory=list)

    def add(self, out: RequestOutput) -> None:
        self.token_ids.extend(out.new_token_ids)
        self.text += out.text_delta
        self.logprobs.extend(out.logprobs)
        self.top_logprobs.extend(out.top_logprobs)
        self.cached_tokens = out.cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.logits is not None:
            self.logits.append(out.logits)
        if out.finished:
            self.finish_reason, self.matched_stop = out.finish_reason, out.matched_stop


class LLM:
    """Runs prompts to completion on one in-process engine (continuous batching inside).

    `options` are `EngineOptions` fields by name (engine/options.py), e.g. `tp_size=2`. With
    more than one rank, call `close()` (or use `with LLM(...) as llm:`) to stop the other rank
    processes; they also stop when this process exits.

    NOTE: rank processes are spawned, so a script that builds an LLM with tp_size > 1 needs the
    usual `if __name__ == "__main__":` guard.
    """

    def __init__(self, model: str, *, keep_logits: bool = False, **options: Any) -> None:
        self._attach(Engine(model, EngineOptions(**options), keep_logits=keep_logits))

    @classmethod
    def over(cls, engine: Engine) -> LLM:
        """The offline API over an engine built elsewhere (its own options and rank hooks)."""
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._next_id = 0

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        ids = [self.encode(p) for p in prompts]
        results: dict[str, Completion] = {}
        for prompt_ids, p in zip(ids, per_prompt):
            rid = f"offline-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(rid, prompt_ids, p)
            results[rid] = Completion(prompt_ids)
        self.run_until_done(results)
        return list(results.values())

    def run_until_done(self, results: dict[str, Completion]) -> None:
        while self.engine.has_work():
            for out in self.engine.step():
                results[out.rid].add(out)
