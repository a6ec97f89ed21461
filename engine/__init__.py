"""pdserve's model engine: what every node computes.

from engine import LLM, SamplingParams
LLM("/path/to/checkpoint").generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm import LLM
    from engine.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    # NOTE: lazy so that `import engine.config` does not pull in torch models and tokenizers.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams"]
