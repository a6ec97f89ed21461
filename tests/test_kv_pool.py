"""Unit tests for the paged KV pool: layouts, budgets, allocator, integrity, slot ids."""

from __future__ import annotations

import pytest
import torch

from engine.kv import (
    RESERVED_PAGE,
    KVLayout,
    PagePool,
    available_memory_bytes,
    head_rows,
    pages_for_budget,
    slot_indices,
)
from engine.kv.pool import parse_mem_available

MHA = KVLayout.mha(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)
MLA = KVLayout.mla(num_layers=3, kv_lora_rank=8, rope_dim=4, dtype=torch.bfloat16)


def test_layout_bytes() -> None:
    # 2 layers * (K + V) * 2 heads * 4 dims * 4 bytes
    assert MHA.bytes_per_token == 2 * 2 * 2 * 4 * 4
    assert MHA.bytes_per_page(16) == 16 * MHA.bytes_per_token
    # 3 layers * one latent of 8 + 4 * 2 bytes
    assert MLA.latent_dim == 12
    assert MLA.bytes_per_token == 3 * 12 * 2
    assert MLA.bytes_per_page(4) == 4 * 3 * 12 * 2
    assert MHA.page_shape(16) == (2, 16, 4) and MLA.page_shape(4) == (4, 12)
    assert MHA.head_page_bytes(16) == 16 * 4 * 4
    with pytest.raises(ValueError, match="MHA only"):
        MLA.head_page_bytes(4)


def test_layout_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"KVLayout\.mha"):
        KVLayout.mha(num_layers=2, num_kv_heads=0, head_dim=4)
    with pytest.raises(ValueError, match="num_layers"):
        KVLayout.mla(num_layers=0, kv_lora_rank=8, rope_dim=4)
    with pytest.raises(ValueError, match="'mha' or 'mla'"):
        KVLayout("gqa", 1, torch.float32)  # type: ignore[arg-type]


def test_budget_from_tokens_rounds_up() -> None:
    assert pages_for_budget(MHA, 16, max_tokens=16) == 1
    assert pages_for_budget(MHA, 16, max_tokens=17) == 2
    assert pages_for_budget(MLA, 1, max_tokens=100) == 100


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
def test_budget_from_bytes_fits_padding_page(layout: KVLayout) -> None:
    page_bytes = layout.bytes_per_page(8)
    pages = pages_for_budget(layout, 8, mem_bytes=10 * page_bytes + page_bytes - 1)
    assert pages == 9  # 10 whole pages fit; one is the padding page
    pool = PagePool(layout, pages, 8)
    assert sum(buf.nbytes for buf in pool.buffers()) <= 10 * page_bytes + page_bytes - 1
    assert sum(buf.nbytes for buf in pool.buffers()) == (pages + 1) * page_bytes


def test_budget_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        pages_for_budget(MHA, 16)
    with pytest.raises(ValueError, match="exactly one"):
        pages_for_budget(MHA, 16, max_tokens=4, mem_bytes=4)
    with pytest.raises(ValueError, match="mem_fraction"):
        pages_for_budget(MHA, 16, mem_bytes=MHA.bytes_per_page(16))


def test_available_memory() -> None:
    assert available_memory_bytes("cpu") > 0
    assert parse_mem_available("MemTotal: 10 kB\nMemAvailable:    2048 kB\n") == 2048 * 1024
    with pytest.raises(RuntimeError, match=r"cache\.max_tokens"):
        parse_mem_available("MemTotal: 10 kB\n")


def test_buffers_mha() -> None:
    pool = PagePool(MHA, num_pages=5, page_size=4)
    assert pool.total_pages == 5 and pool.num_free == 5
    assert pool.k_buffer(1).shape == (6, 2, 4, 4)  # [pages, kv_heads, page_size, head_dim]
    assert pool.v_buffer(0).dtype == torch.float32
    bufs = pool.buffers()
    assert bufs[0] is pool.k_buffer(0) and bufs[1] is pool.v_buffer(0)
    assert bufs[2] is pool.k_buffer(1) and bufs[3] is pool.v_buffer(1)
    assert all(b.is_contiguous() and not b.any() for b in bufs)
    ptr, nbytes, page_nbytes = pool.buffer_descs()[3]
    assert (ptr, nbytes, page_nbytes) == (bufs[3].data_ptr(), 6 * 4 * 2 * 4 * 4, 4 * 2 * 4 * 4)
    with pytest.raises(TypeError, match="latent_buffer"):
        pool.latent_buffer(0)
    with pytest.raises(IndexError):
        pool.k_buffer(2)


def test_buffers_mla() -> None:
    pool = PagePool(MLA, num_pages=3, page_size=2)
    assert pool.latent_buffer(2).shape == (4, 2, 12)
    assert pool.buffers() == [pool.latent_buffer(i) for i in range(3)]
    assert [d[2] for d in pool.buffer_descs()] == [2 * 12 * 2] * 3
    with pytest.raises(TypeError, match="k_buffer"):
        pool.k_buffer(0)


def test_alloc_free_lowest_first_and_never_partial() -> None:
    pool = PagePool(MHA, num_pages=4, page_size=2)
    assert pool.alloc(0) == []
    a = pool.alloc(3)
    assert a == [1, 2, 3] and RESERVED_PAGE not in a
    assert pool.alloc(2) is None  # only 1 free: never partial
    assert pool.num_free == 1
    pool.free([2])
    assert pool.alloc(2) == [2, 4]
    assert pool.num_free == 0 and pool.alloc(1) is None
    pool.free([1, 2, 3, 4])
    assert pool.num_free == 4
    pool.check_integrity()


def test_free_rejects_bad_pages_atomically() -> None:
    pool = PagePool(MHA, num_pages=4, page_size=2)
    pages = pool.alloc(2)
    assert pages == [1, 2]
    with pytest.raises(ValueError, match="double free of KV page 3"):
        pool.free([1, 3])
    with pytest.raises(ValueError, match="double free of KV page 1"):
        pool.free([1, 1])
    with pytest.raises(ValueError, match="padding page"):
        pool.free([0])
    with pytest.raises(ValueError, match="out of range"):
        pool.free([5])
    assert pool.num_free == 2  # nothing above changed the pool
    pool.free(torch.tensor(pages))
    with pytest.raises(ValueError, match="double free"):
        pool.free([2])
    pool.check_integrity()


def test_integrity_catches_leak_twice_held_and_free_held() -> None:
    pool = PagePool(MHA, num_pages=6, page_size=2)
    a, b = pool.alloc(2), pool.alloc(2)
    assert a is not None and b is not None
    pool.check_integrity([a, b])
    with pytest.raises(AssertionError, match=f"KV page {b[0]} leaked"):
        pool.check_integrity([a, b[1:]])
    with pytest.raises(AssertionError, match=f"KV page {a[1]} held twice"):
        pool.check_integrity([a, [*b, a[1]]])
    with pytest.raises(AssertionError, match="KV page 5 is both free and held"):
        pool.check_integrity([a, b, [5]])
    with pytest.raises(AssertionError, match="KV page 0"):
        pool.check_integrity([a, b, [0]])


def test_slot_indices() -> None:
    # page table [7, 3, 5] with page_size 4: positions 0..3 -> page 7, 4..7 -> page 3, ...
    got = slot_indices([7, 3, 5], 2, 10, page_size=4)
    assert got.tolist() == [30, 31, 12, 13, 14, 15, 20, 21]
    assert got.dtype == torch.int64
    pool = PagePool(MHA, num_pages=8, page_size=4)
    assert pool.slot_indices(torch.tensor([7, 3, 5]), 2, 10).tolist() == got.tolist()
    assert slot_indices([1], 0, 0, page_size=4).numel() == 0
    with pytest.raises(ValueError, match="allocate pages"):
        slot_indices([7, 3], 0, 9, page_size=4)


def test_slot_indices_address_the_latent_rows() -> None:
    pool = PagePool(MLA, num_pages=8, page_size=4)
    table, n = [6, 2], 7
    latent = torch.randn(n, 12).to(MLA.dtype)
    pool.latent_buffer(0).view(-1, 12)[pool.slot_indices(table, 0, n)] = latent
    assert torch.equal(pool.latent_buffer(0)[6], latent[:4])
    assert torch.equal(pool.latent_buffer(0)[2, :3], latent[4:])
    assert not pool.latent_buffer(0)[0].any()  # padding page untouched


def test_head_rows_address_head_major_pages() -> None:
    """MHA: head h of slot s sits at buffer[s // page_size, h, s % page_size]."""
    pool = PagePool(MHA, num_pages=8, page_size=4)
    table, n = [6, 2], 7
    k = torch.arange(n * 2 * 4, dtype=torch.float32).view(n, 2, 4)
    slots = pool.slot_indices(table, 0, n)
    rows = head_rows(slots, 2, 4)
    assert rows.shape == (2, n)
    pool.k_buffer(0).view(-1, 4)[rows.t().flatten()] = k.view(-1, 4)
    buf = pool.k_buffer(0)
    assert torch.equal(buf[6], k[:4].transpose(0, 1))  # [heads, page_size, dim]
    assert torch.equal(buf[2, :, :3], k[4:].transpose(0, 1))
    assert not buf[0].any() and not buf[2, :, 3].any()  # padding page, unused slot
    batched = head_rows(slots.view(1, n).expand(3, n), 2, 4)
    assert batched.shape == (3, 2, n) and torch.equal(batched[1], rows)


@pytest.mark.parametrize("heads", [(0, 1), (1, 2), (0, 2)])
def test_a_head_range_of_a_page_is_one_byte_range(heads: tuple[int, int]) -> None:
    """Heads [a, b) of page p of an MHA buffer: base + p * page_bytes + a * head_page_bytes,
    (b - a) * head_page_bytes long, the bytes a peer at another TP size moves in one piece."""
    a, b = heads
    pool = PagePool(MHA, num_pages=4, page_size=4)
    for i, buf in enumerate(pool.buffers()):
        buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(i)))
    head_bytes = MHA.head_page_bytes(4)
    for buf, (ptr, nbytes, page_bytes) in zip(pool.buffers(), pool.buffer_descs(), strict=True):
        raw = buf.view(-1).view(torch.uint8)
        assert ptr == buf.data_ptr() and nbytes == raw.numel()
        for page in range(pool.total_pages + 1):
            start = page * page_bytes + a * head_bytes
            got = raw[start : start + (b - a) * head_bytes]
            assert torch.equal(got, buf[page, a:b].contiguous().view(-1).view(torch.uint8))


def test_the_kv_share_of_free_memory_follows_the_device() -> None:
    """Unset, mem_fraction is most of a GPU's free memory and a tenth of a CPU host's (shared
    with everything else there); set, it is what was set, checked."""
    from engine.options import EngineOptions

    assert EngineOptions().cache.mem_fraction == 0.1
    assert EngineOptions(device="cuda").cache.mem_fraction == 0.85
    assert EngineOptions(device="cuda:3").cache.mem_fraction == 0.85
    assert EngineOptions(device="cuda", mem_fraction=0.5).cache.mem_fraction == 0.5
    with pytest.raises(ValueError, match="mem_fraction"):
        EngineOptions(device="cuda", mem_fraction=1.5)
