"""Engine options: the one list of what a user can set on an engine, with defaults and help.

The offline API (`LLM(model, **options)`), the node flags (`--engine-opt key=value`), the cluster
YAML (`engine:` at the top and per node) and the docs (docs/CONFIG.md) all read this dataclass;
nobody keeps a copy of the names. It imports no torch, so a launcher can check a config
without loading it. `cache` and `scheduler` group the options as the engine's parts use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.layers.attention import ATTENTION_BACKENDS

# Accepted dtype spellings -> torch attribute names (engine/config.py's parse_dtype).
DTYPE_NAMES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
}
DEVICES = ("cpu", "cuda")


def setting(default: Any, help: str) -> Any:
    """A field with its help text (docs/CONFIG.md is written from these)."""
    return field(default=default, metadata={"help": help})


GPU_MEM_FRACTION = 0.85
CPU_MEM_FRACTION = 0.1


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing. Give `max_total_tokens` or `mem_fraction` (of available memory)."""

    page_size: int = 16
    max_total_tokens: int | None = None
    mem_fraction: float = 0.1
    enable_prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError(
                f"max_total_tokens ({self.max_total_tokens}) must hold at least one page "
                f"(page_size {self.page_size})"
            )
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError(f"mem_fraction must be in (0, 1], got {self.mem_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits.

    `max_batch_tokens` is the per-step token budget (prefill chunks + one per decoding request);
    `chunk_size` caps the prefill tokens of one request in one step.
    """

    max_running: int = 256
    max_batch_tokens: int = 4096
    chunk_size: int = 2048
    decode_reserve_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("max_running", "max_batch_tokens", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineOptions:
    """Every engine option, flat, as users name them. Invalid values raise ValueError."""

    dtype: str | None = setting(None, "weights and KV cache dtype (default: the checkpoint's)")
    device: str = setting(
        "cpu", "cpu, or cuda[:N]; with tp_size > 1 a host's ranks take cuda:N, cuda:N+1, .."
    )
    attention_backend: str = setting("torch", "attention implementation, by registered name")
    page_size: int = setting(16, "tokens per KV page (prefill and decode must agree)")
    max_total_tokens: int | None = setting(None, "KV pool size in tokens (else from mem_fraction)")
    mem_fraction: float | None = setting(
        None,
        "share of the memory free after the weights for the KV pool, in (0, 1] (default: "
        f"{GPU_MEM_FRACTION} on CUDA, the rest being activations' and CUDA graphs' room; "
        f"{CPU_MEM_FRACTION} on CPU, whose memory the host shares)",
    )
    enable_prefix_cache: bool = setting(True, "radix prefix cache: reuse the KV of shared prefixes")
    max_running: int = setting(256, "requests in the running batch at most")
    max_batch_tokens: int = setting(4096, "tokens one step computes at most (prefill + decode)")
    chunk_size: int = setting(2048, "prefill tokens of one request in one step at most")
    max_model_len: int | None = setting(
        None, "prompt + output tokens at most (default: the model's)"
    )
    seed: int = setting(0, "seed of torch and of sampling for requests that send none")
    threads: int | None = setting(
        None,
        "torch intra-op threads (default: torch's, every core; in a cluster config, the cores "
        "split among the nodes on the host)",
    )
    cpu_kernels: bool = setting(True, "native AVX-512 CPU kernels where they can run")
    cuda_graphs: bool = setting(
        True,
        "capture decode steps as CUDA graphs at batch-size buckets (1, 2, 4, 8, 16, 24, .., "
        "up to min(max_running, 256); CUDA, triton backend, one rank or every rank of TP, EP "
        "or DP attention, whose experts then exchange tokens at a fixed capacity); false: eager",
    )
    tp_size: int = setting(
        1, "tensor-parallel ranks (processes) of one model instance: heads, MLPs and vocab split"
    )
    ep_size: int = setting(
        1,
        "expert parallelism for MoE: 1 (experts sliced like MLPs) or tp_size (whole experts "
        "spread over the ranks, tokens exchanged with all-to-all)",
    )
    dp_attention: bool = setting(
        False,
        "DP attention (MLA models, as SGLang's --enable-dp-attention): each of the tp_size ranks "
        "runs attention for its own requests over its own latent cache, dense layers whole; "
        "routed experts stay expert-parallel (needs ep_size = tp_size)",
    )
    nnodes: int = setting(1, "hosts the rank group spans (tp_size / nnodes ranks on each)")
    node_rank: int = setting(0, "this host's place among nnodes (0 runs rank 0 and serves)")
    dist_init_addr: str | None = setting(
        None, "host:port where rank 0 hosts the group's rendezvous (default: a free loopback port)"
    )
    dist_timeout_s: float = setting(
        60.0, "a collective (or an idle rank's wait for the next step) fails after this long"
    )
    onednn_cache: int = setting(
        128,
        "compiled oneDNN matmul kernels kept per process (one per shape, about 0.5-1 MB each; "
        "past it, the least recently used are rebuilt); 0: oneDNN's own limit of 1024, which "
        "a prefill node's ever-new batch shapes fill with about 1 GB",
    )

    def __post_init__(self) -> None:
        if self.dtype is not None and str(self.dtype).removeprefix("torch.") not in DTYPE_NAMES:
            raise ValueError(
                f"dtype {self.dtype!r} is unknown (use one of float32, bfloat16, float16)"
            )
        if self.device.partition(":")[0] not in DEVICES:
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend {self.attention_backend!r} is not registered "
                f"(use one of: {', '.join(sorted(ATTENTION_BACKENDS))})"
            )
        if self.onednn_cache < 0:
            raise ValueError(f"onednn_cache must be >= 0, got {self.onednn_cache}")
        for name in ("max_model_len", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self._check_parallel()
        _ = self.cache, self.scheduler  # their own checks

    def _check_parallel(self) -> None:
        if self.tp_size < 1 or self.nnodes < 1:
            raise ValueError(f"tp_size and nnodes must be >= 1, got {self.tp_size}, {self.nnodes}")
        if self.ep_size not in (1, self.tp_size):
            raise ValueError(
                f"ep_size must be 1 or equal tp_size ({self.tp_size}), got {self.ep_size} "
                "(experts are spread over the tensor-parallel ranks)"
            )
        if self.dp_attention and (self.tp_size == 1 or self.ep_size != self.tp_size):
            raise ValueError(
                f"dp_attention needs tp_size > 1 and ep_size = tp_size (got tp_size "
                f"{self.tp_size}, ep_size {self.ep_size}): the attention ranks share the experts"
            )
        if self.tp_size % self.nnodes:
            raise ValueError(
                f"tp_size {self.tp_size} must be a multiple of nnodes {self.nnodes} "
                "(each host runs the same number of ranks)"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("nnodes > 1 needs dist_init_addr (host:port of node_rank 0)")
        if self.dist_init_addr is not None and ":" not in self.dist_init_addr:
            raise ValueError(f"dist_init_addr must be host:port, got {self.dist_init_addr!r}")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")

    @property
    def cache(self) -> CacheConfig:
        fraction = self.mem_fraction
        if fraction is None:
            fraction = GPU_MEM_FRACTION if self.device.startswith("cuda") else CPU_MEM_FRACTION
        return CacheConfig(
            self.page_size, self.max_total_tokens, fraction, self.enable_prefix_cache
        )

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_running, self.max_batch_tokens, self.chunk_size)
