"""The triton backend's MLA path (absorbed projections, one latent KV head) equals the torch
backend's `forward_mla`: output [T, H, kv_lora_rank] and the [latent | k_rope] rows it wrote.

Tiny DeepSeek-V3 sizes (kv_lora_rank 32, rope 8: the rope part pads to a 16-wide tile).
"""

from __future__ import annotations

import pytest
import torch

from tests.attention.harness import SMALL, check_mla

# (new tokens, cached tokens): decode rows (split past 16 keys), fresh prompts, prefix hits
MIXED = [(1, 8), (6, 0), (1, 0), (4, 13), (1, 40), (18, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_mla_ragged_batch_matches_torch(dtype: torch.dtype, page_size: int, device: str) -> None:
    check_mla(MIXED, heads=4, rank=32, rope=8, dtype=dtype, page_size=page_size, device=device)


def test_mla_many_heads_decode_matches_torch(device: str) -> None:
    """24 heads on the one latent head: two blocks of 16 heads per program, the second half
    empty; a 3-way KV split."""
    assert SMALL.num_splits(37) == 3
    check_mla(
        [(1, 36), (1, 5)],
        heads=24,
        rank=32,
        rope=8,
        dtype=torch.float32,
        page_size=16,
        device=device,
    )


def test_mla_default_tiles_wide_latent(device: str) -> None:
    """Default tiles for a 160-wide latent row (32-key tiles), one decode split, page size 8."""
    pair = check_mla(
        [(1, 45), (35, 0)],
        heads=2,
        rank=128,
        rope=32,
        dtype=torch.bfloat16,
        page_size=8,
        device=device,
        blocks=None,
    )
    assert pair.triton.blocks.extend_m == pair.triton.blocks.decode_n == 32
