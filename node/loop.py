"""The scheduler process's loop, shared by prefill and decode nodes.

It receives requests from the node's HTTP process, steps the engine, and sends each request's
outputs back. A role adds its KV transfer through `on_generate`, `on_abort`, `on_output` and
`poll`, and builds itself in `create` (what `node.process.scheduler_main` calls).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, ClassVar

from engine.dp_scheduler import DPScheduler
from engine.engine import Engine, RequestOutput
from engine.sampling import SamplingParams
from node.channel import SchedulerChannel
from node.grammar_queue import GrammarQueue
from node.messages import (
    AbortRequest,
    ControlReply,
    ControlRequest,
    GenerateRequest,
    NodeMessage,
    TokenOutput,
)
from node.metrics import TransferStats
from node.settings import NodeSettings, Role
from node.stats_log import StatsLog, StatsSample

log = logging.getLogger(__name__)

IDLE_POLL_MS = 5


class NodeLoop:
    ROLE: ClassVar[Role]

    def __init__(self, engine: Engine, channel: SchedulerChannel) -> None:
        self.engine = engine
        self.channel = channel
        self.stop_event = threading.Event()
        self.started = time.time()
        self.transfers = TransferStats()  # a PD role's loop observes each room's end
        self.compiling = GrammarQueue(engine.grammars)  # requests whose grammar compiles

    @classmethod
    def create(cls, engine: Engine, channel: SchedulerChannel, settings: NodeSettings) -> NodeLoop:
        """The role's loop over a loaded engine (and its transfer side, built here)."""
        raise NotImplementedError

    # ---- hooks -------------------------------------------------------------------------------

    def on_generate(self, req: GenerateRequest) -> None:
        """Start a request; raise ValueError for a request that cannot run (HTTP 400)."""
        params = self.sampling_params(req)
        self.engine.add_request(req.rid, req.prompt_ids, params, resumed=req.num_resumed)

    def sampling_params(self, req: GenerateRequest) -> SamplingParams:
        return SamplingParams(**req.params)

    def on_abort(self, rid: str) -> None:
        self.engine.abort(rid)

    def poll(self) -> None:
        """Advance transfers; called every iteration."""

    def has_pending(self) -> bool:
        """Work outside the engine (queued or in-flight transfers) keeps the loop spinning."""
        return False

    def extra_info(self) -> dict[str, Any]:
        return {}

    def ready_info(self) -> dict[str, Any]:
        """What the HTTP process learns once the scheduler is up."""
        return {"max_model_len": self.engine.max_model_len}

    def on_output(self, out: RequestOutput) -> None:
        self.send(TokenOutput.from_output(out))

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, stats: StatsLog | None = None) -> None:
        """Serve until `stop_event`; `stats` (the node's stats line) is ticked every iteration."""
        while not self.stop_event.is_set():
            self.engine.check_health()  # a lost rank ends the loop (and the node) at once
            # NOTE: a compiling grammar does not make the loop busy: spinning would take a core
            # from the compile; an idle receive notices it ready within IDLE_POLL_MS
            busy = self.engine.has_work() or self.has_pending()
            for msg in self.channel.receive(0 if busy else IDLE_POLL_MS):
                self.dispatch(msg)
            for req, error in self.compiling.ready():
                self.start(req, error)
            self.poll()
            if self.engine.has_work():
                for out in self.engine.step():
                    self.on_output(out)
            if stats is not None:
                stats.tick(self.stats_sample)

    def dispatch(self, msg: NodeMessage) -> None:
        if isinstance(msg, GenerateRequest):
            if self.compiling.must_wait(msg):
                self.compiling.park(msg)  # NOTE: the loop goes on stepping meanwhile
            else:
                self.start(msg)
        elif isinstance(msg, AbortRequest):
            if not self.compiling.drop(msg.rid):
                self.on_abort(msg.rid)
            # NOTE: ends the request for whoever still waits on it (the HTTP side may not).
            self.send(TokenOutput.aborted(msg.rid))
        elif isinstance(msg, ControlRequest):
            self.send(self.control(msg))

    def start(self, req: GenerateRequest, error: BaseException | None = None) -> None:
        """Start a request, or answer 400: a bad request, or `error` from compiling its
        grammar."""
        try:
            if error is not None:
                raise error
            self.on_generate(req)
        except (ValueError, TypeError) as exc:
            self.send(TokenOutput.failure(req.rid, str(exc), status=400))

    def control(self, msg: ControlRequest) -> ControlReply:
        if msg.op == "server_info":
            return ControlReply(msg.call_id, True, self.server_info())
        if msg.op == "flush_cache":
            return ControlReply(msg.call_id, bool(self.engine.flush_cache()))
        if msg.op == "check_integrity":
            return self.check_integrity(msg.call_id)
        return ControlReply(msg.call_id, False, {"error": f"unknown op {msg.op!r}"})

    def check_integrity(self, call_id: int) -> ControlReply:
        """The engine's page and cache invariants, as an answer: a broken one is a finding to
        report (GET /check_integrity), not a reason for the scheduler process to die."""
        try:
            self.engine.check_integrity()
        except AssertionError as exc:
            log.error("check_integrity failed: %s", exc)
            return ControlReply(call_id, False, {"error": str(exc)})
        return ControlReply(call_id, True)

    def server_info(self) -> dict[str, Any]:
        engine = self.engine
        sched = engine.scheduler
        return {
            "role": self.ROLE,
            "free_pages": engine.num_free_pages,
            "total_pages": engine.total_pages,
            "page_size": engine.pool.page_size,
            "running": len(sched.running),
            "waiting": len(sched.waiting),
            "held": sched.held_count,
            "max_model_len": engine.max_model_len,
            "uptime_s": round(time.time() - self.started, 1),
            "started": self.started,
            "tp_size": engine.options.tp_size,
            "dp_ranks": sched.describe() if isinstance(sched, DPScheduler) else [],
            "ranks": engine.group.describe() if engine.group is not None else [],
            "transfer": self.transfers.info(),
            **self.extra_info(),
        }

    def stats_sample(self) -> StatsSample:
        return StatsSample.of(self.server_info(), self.engine.counters)

    def send(self, out: TokenOutput | ControlReply) -> None:
        self.channel.send(out)

    def close(self) -> None:
        """Release sockets and transfer engines (the loop has stopped), then the engine's ranks."""
        self.compiling.close()
        self.channel.close()
        self.engine.close()
