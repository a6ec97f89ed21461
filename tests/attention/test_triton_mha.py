"""The triton backend's MHA/GQA path equals the torch backend: output and the pages it wrote.

Runs in Triton's interpreter on CPU (tiny shapes: a launch costs ~0.1-0.5 s there).
"""

from __future__ import annotations

import pytest
import torch

from engine.kv.pool import KVLayout, PagePool
from engine.layers.attention import create_backend
from tests.attention.harness import (
    SMALL,
    TritonAttention,
    TritonBlocks,
    check_mha,
    step_batch,
    twins,
)

# (new tokens, cached tokens): decode rows, a one-token prompt, fresh prompts, prefix hits,
# an extend longer than one 16-token block, contexts crossing pages and 16-key blocks
MIXED = [(1, 8), (7, 0), (5, 11), (1, 0), (12, 0), (1, 20), (20, 5), (3, 30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_ragged_batch_matches_torch(dtype: torch.dtype, page_size: int, device: str) -> None:
    """Decode and extend rows in one step, KV splits on (contexts over 16 keys split)."""
    check_mha(MIXED, heads=4, kv_heads=2, dim=16, dtype=dtype, page_size=page_size, device=device)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_groups_match_torch(group: int, device: str) -> None:
    """Query heads per KV head 1 to 8; one decode split (the decode kernel writes directly)."""
    kv_heads = 2 if group < 8 else 1
    blocks = TritonBlocks(extend_m=16, extend_n=16, decode_n=16)
    pair = check_mha(
        [(1, 18), (6, 9), (1, 3)],
        heads=kv_heads * group,
        kv_heads=kv_heads,
        dim=32,
        dtype=torch.float32,
        page_size=4,
        device=device,
        blocks=blocks,
    )
    assert pair.triton.blocks.num_splits(19) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_kv_decode_matches_torch(dtype: torch.dtype, device: str) -> None:
    """Decode only, contexts of 5 to 100 keys cut 7 ways: short ones leave splits empty."""
    shapes = [(1, 99), (1, 36), (1, 4), (1, 63)]
    assert SMALL.num_splits(100) == 7
    check_mha(shapes, heads=8, kv_heads=2, dim=16, dtype=dtype, page_size=4, device=device)


def test_registered_with_default_tiles_fp16(device: str) -> None:
    """`create_backend("triton", ...)` with its default tiles (64), in float16, head_dim 24
    (not a power of two: padded tiles), page size 128."""
    pair = check_mha(
        [(1, 70), (40, 0), (9, 130)],
        heads=4,
        kv_heads=2,
        dim=24,
        dtype=torch.float16,
        page_size=128,
        device=device,
        blocks=None,
    )
    backend = create_backend("triton", pair.triton.pool, 0.5)
    assert isinstance(backend, TritonAttention)
    assert backend.blocks == TritonBlocks() == pair.triton.blocks


def test_prepare_lists_blocks_and_slots(device: str) -> None:
    """The step's tables: decode requests, an extend block per 16 new tokens, write slots."""
    shapes = [(1, 5), (17, 0), (3, 2)]
    batch = step_batch(shapes, page_size=4)
    pair = twins(KVLayout.mha(1, 1, 16, torch.float32), batch, device, SMALL, 0.25)
    meta = pair.triton.prepare(batch)
    assert meta.decode_reqs is not None and meta.decode_reqs.tolist() == [0]
    assert meta.block_reqs is not None and meta.block_reqs.tolist() == [1, 1, 2]
    assert meta.block_starts is not None and meta.block_starts.tolist() == [0, 16, 0]
    assert meta.tables.q_starts.tolist() == [0, 1, 18]
    assert meta.tables.page_tables[0].tolist() == [*batch.page_tables[0], 0, 0, 0]  # padded
    want = [pair.ref.pool.slot_indices(t, c, q + c) for t, (q, c) in zip(batch.page_tables, shapes)]
    assert meta.write_slots.tolist() == torch.cat(want).tolist()


def test_cpu_pool_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.layers.attention import triton_backend

    monkeypatch.setattr(triton_backend, "interpreted", lambda: False)
    pool = PagePool(KVLayout.mha(1, 1, 16, torch.float32), 4, 4)
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 before starting"):
        TritonAttention(pool, 0.25)
