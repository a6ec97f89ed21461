"""The prefill node's scheduler process.

A request with bootstrap fields opens its room with the KV sender and runs prefill-only through
the engine (radix cache on, chunked prefill). Once its first token is sampled, its pages go to
the decode node that reserved the room. The node answers the HTTP request when the room ends:
the first token on success, an error otherwise. Source pages go back to the engine (and its
prefix cache) only when the sender says the room is over, exactly once.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from api.messages import GenerateRequest, TokenOutput
from api.node_loop import NodeLoop
from api.node_server import scheduler_process
from api.settings import NodeSettings
from engine.sampling import SamplingParams
from transfer import KVSender, RoomMetadata, TransferConfig, TransferState
from transfer.pool_view import pool_view

log = logging.getLogger(__name__)

DECLINED = "declined by decode"  # transfer's reason when decode prefills the request itself


@dataclass
class Room:
    rid: str
    room: int
    output: Any = None  # the first token's output, once prefill is done
    sending: bool = False  # pages handed to the sender: only pop_finished frees them


class PrefillLoop(NodeLoop):
    def __init__(
        self,
        engine: Any,
        channel: Any,
        sender: KVSender,
        fault_fraction: float = 0.0,
        seed: str = "",
    ) -> None:
        super().__init__(engine, channel, "prefill")
        self.sender = sender
        self.by_rid: dict[str, Room] = {}
        self.by_room: dict[int, Room] = {}
        self.fault_fraction = fault_fraction  # transfer.fault_fraction: fail rooms on purpose
        self.fault_rng = random.Random(seed)

    def sampling_params(self, params: dict[str, Any]) -> SamplingParams:
        return SamplingParams(**params)

    def on_generate(self, req: GenerateRequest) -> None:
        params = self.sampling_params(req.params)
        if not req.disaggregated:  # sent here directly: serve it whole
            self.engine.add_request(req.rid, req.prompt_ids, params)
            return
        if req.bootstrap_room in self.by_room:
            raise ValueError(f"bootstrap_room {req.bootstrap_room} is already in use")
        ended = self.sender.status(req.bootstrap_room)
        if ended is not None and ended.state.is_final:
            # decode declined the room (it prefills locally) before this request got here
            self.send(TokenOutput(req.rid, finished=True, finish_reason="abort"))
            return
        self.engine.add_request(req.rid, req.prompt_ids, params, prefill_only=True)
        room = Room(req.rid, req.bootstrap_room)
        self.by_rid[req.rid], self.by_room[room.room] = room, room
        self.sender.open_room(room.room)

    def on_output(self, out: Any) -> None:
        room = self.by_rid.get(out.rid)
        if room is None:
            super().on_output(out)
            return
        room.output, room.sending = out, True
        if self.fault_fraction and self.fault_rng.random() < self.fault_fraction:
            # NOTE: the real failure path: decode hears FAILED, poll() releases our pages once.
            self.sender.abort(room.room, "injected transfer fault")
            return
        meta = RoomMetadata(
            first_token_id=out.new_token_ids[0],
            logprob=out.logprobs[0] if out.logprobs else None,
            top_logprobs=tuple(tuple(t) for t in out.top_logprobs[0]) if out.top_logprobs else (),
            cached_tokens=out.cached_tokens,
        )
        self.sender.send(room.room, self.engine.kv_pages(out.rid), meta)

    def on_abort(self, rid: str) -> None:
        room = self.by_rid.get(rid)
        if room is None:
            self.engine.abort(rid)
            return
        if not room.sending:
            self.engine.abort(rid)  # not computed yet: nothing reads its pages
        self.sender.abort(room.room, "aborted by client")

    def has_pending(self) -> bool:
        return bool(self.by_rid)

    def poll(self) -> None:
        for status in self.sender.pop_finished():
            room = self.by_room.pop(status.room, None)
            if room is None:
                continue
            del self.by_rid[room.rid]
            self._room_done(room, status)

    def _room_done(self, room: Room, status: Any) -> None:
        ok = status.state is TransferState.SUCCESS
        if room.sending:
            self.engine.release(room.rid, cache=True)
        else:
            self.engine.abort(room.rid)  # failed before prefill finished
        if ok:
            self.send(TokenOutput.from_output(room.output))
        elif DECLINED in status.reason:
            self.send(TokenOutput(room.rid, finished=True, finish_reason="abort"))  # not an error
        else:
            message = f"KV transfer for room {room.room} failed: {status.reason}"
            self.send(TokenOutput.failure(room.rid, message, status=502))

    def extra_info(self) -> dict[str, Any]:
        return {"transferring": len(self.by_rid), "bootstrap": self.sender.bootstrap_address}

    def close(self) -> None:
        self.sender.close()
        super().close()


def build_sender(engine: Any, settings: NodeSettings) -> KVSender:
    port = settings.bootstrap_port or 0
    options = settings.transfer.config_options()
    config = TransferConfig(host=settings.host, bootstrap_port=port, **options)
    buffers, compat = pool_view(engine.pool, settings.model_name)
    return KVSender(config, buffers, compat)


def scheduler_main(
    settings: NodeSettings, requests_addr: str, outputs_addr: str, conn: Any
) -> None:
    """Entry point of the prefill node's scheduler process."""

    def build() -> tuple[PrefillLoop, dict[str, Any]]:
        from api.ipc import SchedulerChannel
        from engine.engine import Engine
        from engine.llm import engine_config

        engine = Engine(engine_config(settings.model, **settings.engine))
        sender = build_sender(engine, settings)
        channel = SchedulerChannel(requests_addr, outputs_addr)
        fraction = settings.transfer.fault_fraction
        loop = PrefillLoop(engine, channel, sender, fraction, seed=settings.name)
        return loop, {"max_model_len": engine.max_model_len, "bootstrap": sender.bootstrap_address}

    scheduler_process(settings, conn, build)
