"""Real engines, real processes: bytes written on prefill land exactly in decode's pages."""

from __future__ import annotations

import random

import pytest

from transfer import RoomMetadata, TransferState

from .conftest import Cluster

META = RoomMetadata(first_token_id=1234, logprob=-0.25, top_logprobs=((1234, -0.25), (7, -3.5)))


def run_rooms(cluster: Cluster, specs: list[tuple], timeout: float = 30.0) -> None:
    """Open, send and check rooms given as (prefill layout, decode layout, pages, contiguous)."""
    rooms = {}
    for p_layout, d_layout, count, contiguous in specs:
        room = random.getrandbits(62)
        expected = cluster.prefill.open(p_layout, room, count, contiguous)
        cluster.decode.open(d_layout, room, cluster.prefill.address(p_layout), count)
        rooms[room] = expected
    for i, room in enumerate(rooms):
        cluster.prefill.send(room, RoomMetadata(first_token_id=i, cached_tokens=i % 5))
    prefill_done = cluster.prefill.wait(list(rooms), timeout)
    decode_done = cluster.decode.wait(list(rooms), timeout)
    for i, (room, expected) in enumerate(rooms.items()):
        assert prefill_done[room].state is TransferState.SUCCESS, prefill_done[room].reason
        status, landed = decode_done[room]
        assert status.state is TransferState.SUCCESS, status.reason
        assert landed == expected, f"room {room}: bytes differ"
        assert status.metadata == RoomMetadata(first_token_id=i, cached_tokens=i % 5)


@pytest.mark.parametrize(
    ("prefill_layout", "decode_layout"),
    [("mha", "mha"), ("mla", "mla"), ("mha", "page_major"), ("page_major", "mha")],
)
def test_scattered_pages_land_exactly(cluster: Cluster, prefill_layout, decode_layout) -> None:
    room = random.getrandbits(62)
    expected = cluster.prefill.open(prefill_layout, room, 37)
    cluster.decode.open(decode_layout, room, cluster.prefill.address(prefill_layout), 37)
    cluster.prefill.send(room, META)
    assert cluster.prefill.wait([room])[room].state is TransferState.SUCCESS
    status, landed = cluster.decode.wait([room])[room]
    assert status.state is TransferState.SUCCESS, status.reason
    assert landed == expected
    assert status.metadata == META
    page_bytes = sum(v[0].nbytes for v in cluster.prefill.views[prefill_layout])
    assert status.metrics is not None and status.metrics.bytes > 37 * page_bytes


def test_room_of_one_page_and_room_of_4096_pages(cluster: Cluster) -> None:
    run_rooms(cluster, [("mha", "mha", 1, False), ("mha", "mha", 4096, False)])


def test_contiguous_pages_merge_into_few_descriptors(cluster: Cluster) -> None:
    room = random.getrandbits(62)
    expected = cluster.prefill.open("mla", room, 512, contiguous=True)
    cluster.decode.open("mla", room, cluster.prefill.address("mla"), 512, contiguous=True)
    cluster.prefill.send(room, META)
    metrics = cluster.prefill.wait([room])[room].metrics
    status, landed = cluster.decode.wait([room])[room]
    assert landed == expected and status.state is TransferState.SUCCESS
    # 2 latent buffers: one descriptor each when both sides are one run, plus the metadata block
    assert metrics.descriptors <= 2 * 4 + 1


def test_100_concurrent_rooms(cluster: Cluster) -> None:
    layouts = [("mha", "mha"), ("mla", "mla"), ("page_major", "mha")]
    specs = [(*layouts[i % 3], 1 + (i * 7) % 23, False) for i in range(100)]
    run_rooms(cluster, specs)
