"""Model registry: family name -> model class, imported when asked for."""

from __future__ import annotations

from importlib import import_module

from torch import nn

from engine.config import ModelConfig

MODELS = {
    "llama": "engine.models.llama:LlamaForCausalLM",
    "qwen2": "engine.models.llama:LlamaForCausalLM",
    "qwen3": "engine.models.llama:LlamaForCausalLM",
    "deepseek_v2": "engine.models.deepseek_v3:DeepseekV3ForCausalLM",
    "deepseek_v3": "engine.models.deepseek_v3:DeepseekV3ForCausalLM",
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    module, cls = MODELS[cfg.family].split(":")
    return getattr(import_module(module), cls)
