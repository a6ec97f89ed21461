"""Owner ranks (DP attention) through real engines on loopback: a room whose KV one rank owns
moves only between its owners' pools; owners the layouts cannot serve fail the room, saying why.

Both nodes live in this process: rank 0's sender and receiver, rank 1 behind a RankAgent, as a
tensor-parallel node runs them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from transfer import Endpoint, KVBuffer, KVCompat, KVReceiver, KVSender, RoomMetadata, RoomStatus
from transfer import TransferState as S
from transfer.agent import RankAgent, RemoteBackend
from transfer.fake import FakeBackend
from transfer.protocol import (
    PROTOCOL_VERSION,
    Register,
    RegisterReply,
    RoomRequest,
    buffers_to_wire,
    compat_to_wire,
    decode,
    encode,
)
from transfer.ranks import RankKV

from .conftest import BACKENDS
from .harness import fast_config

COMPAT = KVCompat("tiny", "uint8", 4, 2, "mla")
META = RoomMetadata(first_token_id=42)
LAYERS, PAGES, PAGE_BYTES = 2, 16, 64
SRC_PAGES, DST_PAGES = [7, 2, 12], [3, 5, 9]  # distinct ids, so a wrong mapping shows


def buffers(pool: np.ndarray) -> tuple[KVBuffer, ...]:
    return tuple(KVBuffer.from_array(pool[b]) for b in range(LAYERS))


class DPNodes:
    """A prefill and a decode node of two ranks each, replicated pools (MLA's latent); every
    prefill rank's pages hold their own bytes, the decode pools start zeroed."""

    def __init__(self, backend: str) -> None:
        config = fast_config(backend)
        rng = np.random.default_rng(0)
        self.src = [rng.integers(1, 256, (LAYERS, PAGES, PAGE_BYTES), np.uint8) for _ in range(2)]
        self.dst = [np.zeros((LAYERS, PAGES, PAGE_BYTES), np.uint8) for _ in range(2)]
        self.agents = [
            RankAgent(config, buffers(self.src[1])),
            RankAgent(config, buffers(self.dst[1])),
        ]
        prefill_ranks = [RankKV(r, buffers(pool)) for r, pool in enumerate(self.src)]
        decode_ranks = [
            RankKV(0, buffers(self.dst[0])),
            RankKV(1, buffers(self.dst[1]), endpoint=self.agents[1].endpoint),
        ]
        engines = [RemoteBackend(self.agents[0].address, backend)]
        self.sender = KVSender(
            config, buffers(self.src[0]), COMPAT, ranks=prefill_ranks, rank_backends=engines
        )
        self.receiver = KVReceiver(config, buffers(self.dst[0]), COMPAT, ranks=decode_ranks)

    def run(self, src_rank: int, dst_rank: int) -> tuple[RoomStatus, RoomStatus]:
        """One room with these owners, from open to both sides' final status."""
        room = random.getrandbits(62)
        self.sender.open_room(room)
        address = self.sender.bootstrap_address
        self.receiver.open_room(room, address, DST_PAGES, dst_rank=dst_rank)
        self.sender.send(room, SRC_PAGES, META, src_rank=src_rank)
        return finished(self.sender, room), finished(self.receiver, room)

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()
        for agent in self.agents:
            agent.close()


def finished(side: KVSender | KVReceiver, room: int, timeout: float = 10.0) -> RoomStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [s for s in side.pop_finished() if s.room == room]
        if done:
            return done[0]
        time.sleep(0.002)
    raise AssertionError(f"room {room} did not finish in {timeout}s")


@pytest.fixture(scope="module", params=BACKENDS)
def nodes(request: pytest.FixtureRequest) -> Iterator[DPNodes]:
    pair = DPNodes(request.param)
    yield pair
    assert pair.sender.open_rooms() == 0 and pair.receiver.open_rooms() == 0
    pair.close()


@pytest.mark.parametrize(
    ("src_rank", "dst_rank", "writes"),  # writes: decode rank -> the prefill rank it gets
    [
        (1, 1, {1: 1}),
        (0, 1, {1: 0}),
        (1, -1, {0: 1, 1: 1}),
        (-1, 0, {0: 0}),
        (-1, -1, {0: 0, 1: 1}),  # no owner: the plan, as before (rank d from rank d)
    ],
)
def test_an_owned_room_moves_only_between_its_owners(
    nodes: DPNodes, src_rank: int, dst_rank: int, writes: dict[int, int]
) -> None:
    for pool in nodes.dst:
        pool[...] = 0
    prefill, decode = nodes.run(src_rank, dst_rank)
    assert prefill.state is S.SUCCESS, prefill.reason
    assert decode.state is S.SUCCESS, decode.reason
    assert decode.metadata == META
    for d, pool in enumerate(nodes.dst):
        if d in writes:
            assert (pool[:, DST_PAGES] == nodes.src[writes[d]][:, SRC_PAGES]).all()
        untouched = [p for p in range(PAGES) if d not in writes or p not in DST_PAGES]
        assert not pool[:, untouched].any(), f"decode rank {d} got bytes it does not own"


@pytest.mark.parametrize(
    ("src_rank", "dst_rank", "reason"),
    [
        (0, 2, "decode rank 2 cannot own the room: the decode node has ranks 0..1"),
        (-1, -3, "decode rank -3 cannot own the room: the decode node has ranks 0..1"),
        (2, 0, "prefill rank 2 cannot own the room: the prefill node has ranks 0..1"),
    ],
)
def test_an_owner_out_of_range_fails_the_room(
    nodes: DPNodes, src_rank: int, dst_rank: int, reason: str
) -> None:
    prefill, decode = nodes.run(src_rank, dst_rank)
    assert prefill.state is S.FAILED and reason in prefill.reason
    assert decode.state is S.FAILED and reason in decode.reason


@pytest.fixture(scope="module")
def sliced() -> Iterator[tuple[KVSender, KVReceiver]]:
    """One rank each side, its pool sliced by heads (MHA): all 4 heads, 16 bytes each."""
    config = fast_config("mooncake")
    src, dst = (np.zeros((LAYERS, PAGES, PAGE_BYTES), np.uint8) for _ in range(2))
    ranks = [RankKV(0, buffers(pool), 0, 4, PAGE_BYTES // 4) for pool in (src, dst)]
    sender = KVSender(config, buffers(src), COMPAT, ranks=ranks[:1])
    receiver = KVReceiver(config, buffers(dst), COMPAT, ranks=ranks[1:])
    yield sender, receiver
    receiver.close()
    sender.close()


@pytest.mark.parametrize(("src_rank", "dst_rank", "side"), [(-1, 0, "decode"), (0, -1, "prefill")])
def test_an_owner_over_heads_sliced_kv_fails_the_room(
    sliced: tuple[KVSender, KVReceiver], src_rank: int, dst_rank: int, side: str
) -> None:
    sender, receiver = sliced
    room = random.getrandbits(62)
    sender.open_room(room)
    receiver.open_room(room, sender.bootstrap_address, DST_PAGES, dst_rank=dst_rank)
    sender.send(room, SRC_PAGES, META, src_rank=src_rank)
    reason = (
        f"{side} rank 0 cannot own the room: KV is sliced by heads here, and owner ranks are for "
        "DP attention over a replicated latent cache"
    )
    for status in finished(sender, room), finished(receiver, room):
        assert status.state is S.FAILED and reason in status.reason


def test_prefill_refuses_a_request_for_a_rank_or_pages_the_decode_lacks() -> None:
    """A decode that skipped its own check (a raw socket here) still cannot name a rank it
    lacks, or pages past the owning rank's pool (rank 1 holds 4 pages, rank 0 16)."""
    config = fast_config("fake")
    src = [np.zeros((LAYERS, pages, PAGE_BYTES), np.uint8) for pages in (PAGES, PAGES)]
    dst = [np.zeros((LAYERS, pages, PAGE_BYTES), np.uint8) for pages in (PAGES, 4)]
    ours = [RankKV(r, buffers(pool)) for r, pool in enumerate(src)]
    theirs = [RankKV(r, buffers(p), endpoint=Endpoint("fake", f"r{r}")) for r, p in enumerate(dst)]
    sender = KVSender(
        config, buffers(src[0]), COMPAT, FakeBackend(), ranks=ours, rank_backends=[FakeBackend()]
    )
    context = zmq.Context()
    ghost = context.socket(zmq.DEALER)
    ghost.setsockopt(zmq.IDENTITY, b"ghost")
    ghost.setsockopt(zmq.RCVTIMEO, 5000)  # a missing answer fails the test instead of hanging
    ghost.connect(f"tcp://{sender.bootstrap_address}")
    try:
        wire = tuple(r.to_wire() for r in theirs)
        register = Register(
            PROTOCOL_VERSION, "ghost", "fake", "r0", b"", buffers_to_wire(buffers(dst[0])),
            compat_to_wire(COMPAT), 0, 256, 4, wire,
        )  # fmt: skip
        ghost.send(encode(register))
        assert decode(ghost.recv()) == RegisterReply("")
        refused = {
            1: (RoomRequest(1, (2, 10), 0, 1), "destination page 10 out of range (decode rank 1"),
            2: (RoomRequest(2, (2,), 0, 2), "decode rank 2 cannot own the room: the decode node"),
        }
        for request, _ in refused.values():
            ghost.send(encode(request))
        for _ in refused:
            update = decode(ghost.recv())
            assert update.state == S.FAILED and refused[update.room][1] in update.reason
    finally:
        ghost.close(linger=0)
        context.term()
        sender.close()
