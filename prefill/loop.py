"""The prefill node's scheduler loop.

A request with bootstrap fields opens its room with the KV sender and runs prefill-only through
the engine (radix cache on, chunked prefill). Once its first token is sampled, its pages go to
the decode node that reserved the room. The node answers the HTTP request when the room ends:
the first token on success, an error otherwise. Source pages go back to the engine (and its
prefix cache) only when the sender says the room is over, exactly once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engine.engine import Engine, RequestOutput
from node.channel import SchedulerChannel
from node.kv_link import build_sender
from node.loop import NodeLoop
from node.messages import GenerateRequest, TokenOutput
from node.settings import NodeSettings
from transfer import (
    ABORTED_BY_CLIENT,
    DECLINED,
    KVSender,
    RoomMetadata,
    RoomStatus,
    TransferState,
)

log = logging.getLogger(__name__)


@dataclass
class Room:
    rid: str
    room: int
    output: RequestOutput | None = None  # the first token's output, once prefill is done
    sending: bool = False  # pages handed to the sender: only pop_finished frees them


class PrefillLoop(NodeLoop):
    ROLE = "prefill"

    def __init__(self, engine: Engine, channel: SchedulerChannel, sender: KVSender) -> None:
        super().__init__(engine, channel)
        self.sender = sender
        self.by_rid: dict[str, Room] = {}
        self.by_room: dict[int, Room] = {}

    @classmethod
    def create(
        cls, engine: Engine, channel: SchedulerChannel, settings: NodeSettings
    ) -> PrefillLoop:
        return cls(engine, channel, build_sender(engine, settings))

    def on_generate(self, req: GenerateRequest) -> None:
        params = self.sampling_params(req)
        if not req.disaggregated:  # sent here directly: serve it whole
            self.engine.add_request(req.rid, req.prompt_ids, params, resumed=req.num_resumed)
            return
        assert req.bootstrap_room is not None
        if req.bootstrap_room in self.by_room:
            raise ValueError(f"bootstrap_room {req.bootstrap_room} is already in use")
        self.engine.add_request(
            req.rid, req.prompt_ids, params, prefill_only=True, resumed=req.num_resumed
        )
        try:
            # NOTE: a room decode declined before this request got here ends at once; the next
            # poll() (before any engine step) drops the request without computing it
            self.sender.open_room(req.bootstrap_room)
        except ValueError:
            self.engine.abort(req.rid)  # the room is taken: this request never runs
            raise
        room = Room(req.rid, req.bootstrap_room)
        self.by_rid[req.rid], self.by_room[room.room] = room, room

    def on_output(self, out: RequestOutput) -> None:
        room = self.by_rid.get(out.rid)
        if room is None:
            super().on_output(out)
            return
        room.output, room.sending = out, True
        meta = RoomMetadata(
            first_token_id=out.new_token_ids[0],
            logprob=out.logprobs[0] if out.logprobs else None,
            top_logprobs=tuple(tuple(t) for t in out.top_logprobs[0]) if out.top_logprobs else (),
            cached_tokens=out.cached_tokens,
        )
        owner = self.engine.kv_owner(out.rid)
        self.sender.send(room.room, self.engine.kv_pages(out.rid), meta, src_rank=owner)

    def on_abort(self, rid: str) -> None:
        room = self.by_rid.get(rid)
        if room is None:
            self.engine.abort(rid)
            return
        if not room.sending:
            self.engine.abort(rid)  # not computed yet: nothing reads its pages
        self.sender.abort(room.room, ABORTED_BY_CLIENT)

    def has_pending(self) -> bool:
        return bool(self.by_rid)

    def poll(self) -> None:
        for status in self.sender.pop_finished():
            self.transfers.observe(status)
            room = self.by_room.pop(status.room, None)
            if room is None:
                continue
            del self.by_rid[room.rid]
            self._room_done(room, status)

    def _room_done(self, room: Room, status: RoomStatus) -> None:
        if room.sending:
            self.engine.release(room.rid, cache=True)
        else:
            self.engine.abort(room.rid)  # failed before prefill finished
        if status.state is TransferState.SUCCESS and room.output is not None:
            self.send(TokenOutput.from_output(room.output))
        elif DECLINED in status.reason:
            self.send(TokenOutput.aborted(room.rid))  # not an error
        else:
            message = f"KV transfer for room {room.room} failed: {status.reason}"
            self.send(TokenOutput.failure(room.rid, message, status=502))

    def ready_info(self) -> dict[str, Any]:
        return {**super().ready_info(), "bootstrap": self.sender.bootstrap_address}

    def extra_info(self) -> dict[str, Any]:
        return {"transferring": len(self.by_rid), "bootstrap": self.sender.bootstrap_address}

    def close(self) -> None:
        self.sender.close()
        super().close()
