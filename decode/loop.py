"""The decode node's scheduler loop.

Three queues, in DESIGN.md's words: prealloc (requests waiting for pages: reserved for prompt +
decode headroom before any transfer, never overcommitted, FIFO, with a timeout), transfer
(rooms in flight; pages return only when the transfer layer says no write can touch them), and
running (the engine's continuous batch). Requests without bootstrap fields, whose uncached
prompt is shorter than `local_prefill_threshold`, or that ask for their prompt's logprobs (which
need every prompt position's logits, here), are prefilled here (the colocated path).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from engine.engine import Engine
from engine.sampling import SamplingParams
from node.channel import SchedulerChannel
from node.kv_link import build_receiver
from node.loop import NodeLoop
from node.messages import GenerateRequest, TokenOutput
from node.settings import NodeSettings
from transfer import NO_TRANSFER, KVReceiver, RoomStatus, TransferState

log = logging.getLogger(__name__)


@dataclass
class Pending:
    req: GenerateRequest
    params: SamplingParams
    since: float


class DecodeLoop(NodeLoop):
    ROLE = "decode"

    def __init__(
        self,
        engine: Engine,
        channel: SchedulerChannel,
        settings: NodeSettings,
        receiver: KVReceiver | None,
    ) -> None:
        super().__init__(engine, channel)
        self.settings = settings
        self.receiver = receiver
        self.prealloc: OrderedDict[str, Pending] = OrderedDict()
        self.rooms: dict[int, str] = {}  # room -> rid, while the transfer is in flight
        self.room_of: dict[str, int] = {}
        # rid -> when its pages may be reused: failed rooms prefill never confirmed it stopped
        # writing (transfer.quarantine_s); the request has already failed
        self.quarantine: dict[str, float] = {}

    @classmethod
    def create(
        cls, engine: Engine, channel: SchedulerChannel, settings: NodeSettings
    ) -> DecodeLoop:
        colocated_only = settings.transfer.backend == NO_TRANSFER
        receiver = None if colocated_only else build_receiver(engine, settings)
        return cls(engine, channel, settings, receiver)

    def on_generate(self, req: GenerateRequest) -> None:
        params = self.sampling_params(req)
        if not req.disaggregated or self._prefill_here(req, params):
            self.engine.add_request(req.rid, req.prompt_ids, params, resumed=req.num_resumed)
            return
        if req.bootstrap_room in self.rooms:
            raise ValueError(f"bootstrap_room {req.bootstrap_room} is already in use")
        self.engine.check_request(req.prompt_ids, params, req.num_resumed)
        self.prealloc[req.rid] = Pending(req, params, time.monotonic())

    def _prefill_here(self, req: GenerateRequest, params: SamplingParams) -> bool:
        if self.receiver is None:
            return True
        if params.prompt_logprobs is None or req.num_resumed:
            threshold = self.settings.local_prefill_threshold
            if threshold <= 0:
                return False
            uncached = len(req.prompt_ids) - self.engine.cached_prefix_len(req.prompt_ids)
            if uncached >= threshold:
                return False
        # NOTE: the prefill node got the same request; tell it to drop the room.
        self.receiver.decline(req.bootstrap_room, req.bootstrap_address, "it prefills locally")
        return True

    def on_abort(self, rid: str) -> None:
        if self.prealloc.pop(rid, None) is not None or rid in self.quarantine:
            return
        room = self.room_of.get(rid)
        if room is not None:
            self.receiver.abort(room, "aborted by client")  # pages come back via poll()
            return
        self.engine.abort(rid)

    def has_pending(self) -> bool:
        # NOTE: not the quarantine: its pages wait for seconds; the idle poll releases them
        return bool(self.prealloc or self.rooms)

    def poll(self) -> None:
        self._release_quarantined()
        self._reserve_pages()
        self._expire_prealloc()
        if self.receiver is not None:
            for status in self.receiver.pop_finished():
                self.transfers.observe(status)
                self._room_done(status)

    def _reserve_pages(self) -> None:
        while self.prealloc:
            rid, pending = next(iter(self.prealloc.items()))
            req = pending.req
            headroom = self.settings.decode_headroom_tokens
            pages = self.engine.reserve(
                rid, req.prompt_ids, pending.params, headroom, resumed=req.num_resumed
            )
            if pages is None:
                return  # FIFO: wait until running requests give pages back
            del self.prealloc[rid]
            self.rooms[req.bootstrap_room] = rid
            self.room_of[rid] = req.bootstrap_room
            owner = self.engine.kv_owner(rid)
            self.receiver.open_room(
                req.bootstrap_room, req.bootstrap_address, pages, dst_rank=owner
            )

    def _expire_prealloc(self) -> None:
        limit = self.settings.prealloc_timeout_s
        now = time.monotonic()
        while self.prealloc:
            rid, pending = next(iter(self.prealloc.items()))
            if now - pending.since < limit:
                return
            del self.prealloc[rid]
            msg = f"no KV pages became free within prealloc_timeout_s={limit}s (node overloaded)"
            self.send(TokenOutput.failure(rid, msg, status=503))

    def _release_quarantined(self) -> None:
        now = time.monotonic()
        for rid, until in list(self.quarantine.items()):
            if until <= now:
                del self.quarantine[rid]
                self.engine.release(rid, cache=False)

    def _room_done(self, status: RoomStatus) -> None:
        rid = self.rooms.pop(status.room, None)
        if rid is None:
            return
        del self.room_of[rid]
        if status.state is TransferState.SUCCESS and status.metadata is not None:
            meta = status.metadata
            out = self.engine.activate(
                rid, meta.first_token_id, meta.logprob, meta.top_logprobs, meta.cached_tokens
            )
            self.on_output(out)
            return
        if status.quarantine_s > 0:
            self.quarantine[rid] = time.monotonic() + status.quarantine_s
        else:
            self.engine.release(rid, cache=False)
        self.send(TokenOutput.failure(rid, f"KV transfer failed: {status.reason}", status=502))

    def extra_info(self) -> dict[str, Any]:
        return {
            "prealloc": len(self.prealloc),
            "transferring": len(self.rooms),
            "quarantined": len(self.quarantine),
        }

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        super().close()
