"""Tiny random-weight Hugging Face checkpoints with real offline tokenizers (`pdserve make-model`).

No model can be downloaded here, so tests, benchmarks and local clusters write their own:
`modelgen.make.make_model("qwen3", out)` writes what an HF model repository holds, and
transformers loads it as it loads a real one (the engine's correctness oracle). No engine code
uses these files; this package may import `engine`, never the reverse.

- spec.py: `MakeSpec`, the arguments, shared by the `make-model` flags and a cluster YAML's
  `model.make` (cluster/modelcache.py hashes it into the cache directory's name)
- make.py: `make_model`, the entry
- archs.py: the architecture table and the transformers config each becomes (shape.py: sizes)
- deepseek.py: DeepSeek V2/V3 config pieces (MLA, MoE routing, YaRN)
- weights.py: seeded random weights with HF tensor names, written as safetensors (shards)
- fp8.py: FP8 block quantization as DeepSeek-V3 ships it
- tokenizers.py: the offline Qwen and DeepSeek tokenizers and their special tokens
- chat_templates.py: the families' chat templates, which neither tokenizer package ships

NOTE: spec.py and what it imports stay free of torch and transformers: the cluster CLI and
config read `MakeSpec` in every process, and only writing a model needs the heavy imports.
"""
