"""The decode node's scheduler loop reacting to finished KV rooms, with a real engine and a
stand-in for the transfer receiver (the receiver itself is tested in tests/transfer)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from decode.loop import DecodeLoop
from engine.engine import Engine
from engine.options import EngineOptions
from node.messages import ControlReply, ControlRequest, GenerateRequest, TokenOutput
from node.settings import NodeSettings
from transfer.base import RoomStatus, TransferState

PROMPT = list(range(100, 140))
PARAMS = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


class Channel:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)


class Receiver:
    """Records the rooms the loop opens; hands back the statuses a test queues."""

    def __init__(self) -> None:
        self.opened: dict[int, list[int]] = {}
        self.finished: list[RoomStatus] = []

    def open_room(self, room: int, address: str, pages: list[int], dst_rank: int = -1) -> None:
        self.opened[room] = list(pages)

    def pop_finished(self) -> list[RoomStatus]:
        done, self.finished = self.finished, []
        return done

    def abort(self, room: int, reason: str) -> None:
        raise AssertionError("the test does not abort rooms")

    def close(self) -> None:
        pass


@pytest.fixture
def loop(make_tiny) -> DecodeLoop:
    options = EngineOptions(dtype="float32", page_size=16, max_total_tokens=4096)
    engine = Engine(str(make_tiny("llama")), options)
    settings = NodeSettings(role="decode", model=str(make_tiny("llama")))
    return DecodeLoop(engine, Channel(), settings, Receiver())


def start_room(loop: DecodeLoop, rid: str, room: int) -> list[int]:
    loop.on_generate(GenerateRequest(rid, PROMPT, PARAMS, "127.0.0.1", 8998, room))
    loop.poll()
    return loop.receiver.opened[room]


def failures(loop: DecodeLoop) -> list[TokenOutput]:
    return [m for m in loop.channel.sent if isinstance(m, TokenOutput) and m.error]


def test_unconfirmed_failed_room_fails_now_and_frees_pages_after_the_quarantine(loop) -> None:
    engine = loop.engine
    total = engine.num_free_pages
    start_room(loop, "r1", 7)
    held = engine.num_free_pages
    assert held < total
    loop.receiver.finished.append(
        RoomStatus(7, TransferState.FAILED, "prefill silent for 6.0s", quarantine_s=0.5)
    )
    loop.poll()
    [failure] = failures(loop)
    assert failure.rid == "r1" and failure.status == 502 and "silent" in failure.error
    assert engine.num_free_pages == held  # held on: a late write may still land
    assert loop.extra_info()["quarantined"] == 1
    loop.on_abort("r1")  # a late client abort must not free them early either
    assert engine.num_free_pages == held
    deadline = time.monotonic() + 5
    while engine.num_free_pages != total:
        assert time.monotonic() < deadline, "quarantined pages never came back"
        time.sleep(0.05)
        loop.poll()
    assert loop.extra_info()["quarantined"] == 0
    engine.check_integrity()


def test_confirmed_failed_room_frees_pages_at_once(loop) -> None:
    total = loop.engine.num_free_pages
    start_room(loop, "r2", 8)
    loop.receiver.finished.append(RoomStatus(8, TransferState.FAILED, "prefill: engine error"))
    loop.poll()
    assert [f.rid for f in failures(loop)] == ["r2"]
    assert loop.engine.num_free_pages == total
    loop.engine.check_integrity()


def test_check_integrity_answers_a_leak_instead_of_raising(loop) -> None:
    call = ControlRequest(1, "check_integrity")
    assert loop.control(call) == ControlReply(1, True)
    loop.engine.pool.alloc(2)  # taken from the pool by no request: a leak
    reply = loop.control(ControlRequest(2, "check_integrity"))
    assert not reply.ok and "leaked" in reply.data["error"]
