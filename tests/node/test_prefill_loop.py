"""The prefill node's scheduler loop with a real engine and a stand-in for the KV sender (the
sender itself is tested in tests/transfer): rooms open, pages go out once the first token is
sampled, and come back exactly once when the sender says the room is over."""

from __future__ import annotations

from typing import Any

import pytest

from engine.engine import Engine
from engine.options import EngineOptions
from node.messages import AbortRequest, GenerateRequest, TokenOutput
from prefill.loop import DECLINED, PrefillLoop
from transfer import RoomMetadata, RoomStatus, TransferState

PROMPT = list(range(200, 250))  # 50 tokens: 4 pages of 16
PARAMS = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


class Channel:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        pass


class Sender:
    """Records what the loop asks of the sender; hands back the statuses a test queues. A room
    in `ended` (decode declined it first) ends as soon as it is opened, as KVSender's do."""

    bootstrap_address = "127.0.0.1:8998"

    def __init__(self) -> None:
        self.opened: list[int] = []
        self.sent: dict[int, tuple[list[int], RoomMetadata]] = {}
        self.aborted: dict[int, str] = {}
        self.ended: dict[int, RoomStatus] = {}
        self.finished: list[RoomStatus] = []

    def open_room(self, room: int) -> None:
        if room in self.opened:
            raise ValueError(f"room {room} was already opened on this prefill node")
        self.opened.append(room)
        if room in self.ended:
            self.finished.append(self.ended.pop(room))

    def send(self, room: int, pages: list[int], meta: RoomMetadata, src_rank: int = -1) -> None:
        self.sent[room] = (list(pages), meta)

    def abort(self, room: int, reason: str) -> None:
        self.aborted[room] = reason

    def pop_finished(self) -> list[RoomStatus]:
        done, self.finished = self.finished, []
        return done

    def close(self) -> None:
        pass


@pytest.fixture
def loop(make_tiny) -> PrefillLoop:
    options = EngineOptions(dtype="float32", page_size=16, max_total_tokens=4096)
    engine = Engine(str(make_tiny("llama")), options)
    return PrefillLoop(engine, Channel(), Sender())  # type: ignore[arg-type]


def pd_request(rid: str, room: int) -> GenerateRequest:
    return GenerateRequest(rid, PROMPT, PARAMS, "127.0.0.1", 8998, room)


def run_engine(loop: PrefillLoop) -> None:
    while loop.engine.has_work():
        for out in loop.engine.step():
            loop.on_output(out)


def outputs(loop: PrefillLoop) -> list[TokenOutput]:
    return [m for m in loop.channel.sent if isinstance(m, TokenOutput)]


def test_room_sends_the_prompt_pages_and_answers_with_the_first_token(loop) -> None:
    sender, engine = loop.sender, loop.engine
    total = engine.num_free_pages
    loop.dispatch(pd_request("r1", 7))
    assert sender.opened == [7] and loop.has_pending()
    run_engine(loop)
    pages, meta = sender.sent[7]
    assert len(pages) == 4 and pages == engine.kv_pages("r1")
    assert outputs(loop) == []  # nothing is answered before the room ends
    assert engine.num_free_pages == total - 4  # held while the sender may read them
    sender.finished.append(RoomStatus(7, TransferState.SUCCESS, metadata=meta))
    loop.poll()
    [out] = outputs(loop)
    assert out.rid == "r1" and out.finished and out.error is None
    assert out.token_ids == [meta.first_token_id] and out.prompt_tokens == len(PROMPT)
    assert not loop.has_pending() and not engine.scheduler.held
    engine.check_integrity()
    assert engine.cached_prefix_len(PROMPT) == 48  # the pages went to the prefix cache
    assert engine.flush_cache() and engine.num_free_pages == total


def test_room_that_fails_mid_send_frees_its_pages_once_and_answers_502(loop) -> None:
    engine = loop.engine
    total = engine.num_free_pages
    loop.dispatch(pd_request("r2", 8))
    run_engine(loop)
    loop.sender.finished.append(RoomStatus(8, TransferState.FAILED, "decode went away"))
    loop.poll()
    loop.poll()  # a second poll finds nothing more to free
    [out] = outputs(loop)
    assert out.status == 502 and "room 8 failed: decode went away" in (out.error or "")
    engine.check_integrity()
    engine.flush_cache()
    assert engine.num_free_pages == total


def test_abort_before_the_first_token_drops_the_request_and_the_room(loop) -> None:
    engine = loop.engine
    total = engine.num_free_pages
    loop.dispatch(pd_request("r3", 9))
    loop.dispatch(AbortRequest("r3"))  # still waiting for the engine
    assert loop.sender.aborted == {9: "aborted by client"}
    assert [o.finish_reason for o in outputs(loop)] == ["abort"]  # the HTTP side hears it now
    assert engine.num_free_pages == total and not engine.has_work()
    loop.sender.finished.append(RoomStatus(9, TransferState.FAILED, "aborted by client"))
    loop.poll()
    assert engine.num_free_pages == total and not loop.has_pending()
    engine.check_integrity()


def test_abort_while_sending_keeps_the_pages_until_the_sender_lets_go(loop) -> None:
    engine = loop.engine
    total = engine.num_free_pages
    loop.dispatch(pd_request("r4", 10))
    run_engine(loop)
    loop.dispatch(AbortRequest("r4"))
    assert loop.sender.aborted == {10: "aborted by client"}
    assert engine.num_free_pages == total - 4  # a write may still read them
    loop.sender.finished.append(RoomStatus(10, TransferState.FAILED, "aborted by client"))
    loop.poll()
    engine.check_integrity()
    engine.flush_cache()
    assert engine.num_free_pages == total


def test_room_declined_by_decode_ends_without_an_error(loop) -> None:
    loop.sender.ended[11] = RoomStatus(11, TransferState.FAILED, f"{DECLINED}: prefills locally")
    loop.dispatch(pd_request("r5", 11))  # decode's decline came first
    loop.poll()  # before any engine step: dropped, never computed
    assert not loop.engine.has_work()
    loop.dispatch(pd_request("r6", 12))
    loop.sender.finished.append(RoomStatus(12, TransferState.FAILED, f"{DECLINED}: local"))
    loop.poll()  # declined after it started: not computed, dropped
    assert [(o.rid, o.finish_reason, o.error) for o in outputs(loop)] == [
        ("r5", "abort", None),
        ("r6", "abort", None),
    ]
    assert not loop.engine.has_work() and not loop.has_pending()
    loop.engine.check_integrity()


def test_request_without_bootstrap_fields_is_served_whole(loop) -> None:
    loop.dispatch(GenerateRequest("plain", PROMPT, PARAMS))
    run_engine(loop)
    done = outputs(loop)
    assert sum(len(o.token_ids) for o in done) == 8 and done[-1].finish_reason == "length"
    assert loop.sender.opened == []


def test_bad_requests_answer_400(loop) -> None:
    loop.dispatch(pd_request("a", 13))
    loop.dispatch(pd_request("b", 13))  # the room is taken
    loop.dispatch(GenerateRequest("c", PROMPT, {"max_tokens": 0}))
    failures = {o.rid: o for o in outputs(loop) if o.error}
    assert set(failures) == {"b", "c"} and {o.status for o in failures.values()} == {400}
    assert "bootstrap_room 13 is already in use" in (failures["b"].error or "")
    loop.sender.opened.append(14)  # a room the sender knows already (another node's request)
    loop.dispatch(pd_request("d", 14))
    assert "room 14 was already opened" in (outputs(loop)[-1].error or "")
    assert [r.rid for r in loop.engine.scheduler.waiting] == ["a"]  # "d" left nothing behind
