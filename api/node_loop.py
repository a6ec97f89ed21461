"""The scheduler process's loop, shared by prefill and decode nodes.

It receives requests from the node's HTTP process, steps the engine, and sends each request's
outputs back. Role-specific work (KV transfer) hooks in through `on_generate`, `on_abort` and
`poll`. The engine is duck-typed here (api does not import engine): it needs `has_work()`,
`step()`, `abort(rid)`, `flush_cache()`, `check_integrity()`, `num_free_pages`, `pool`,
`scheduler`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from api.ipc import SchedulerChannel
from api.messages import (
    AbortRequest,
    ControlReply,
    ControlRequest,
    GenerateRequest,
    TokenOutput,
)

log = logging.getLogger(__name__)

IDLE_POLL_MS = 5


class NodeLoop:
    def __init__(self, engine: Any, channel: SchedulerChannel, role: str) -> None:
        self.engine = engine
        self.channel = channel
        self.role = role
        self.stop_event = threading.Event()
        self.started = time.time()

    # ---- hooks -------------------------------------------------------------------------------

    def on_generate(self, req: GenerateRequest) -> None:
        """Start a request; raise ValueError for a request that cannot run (HTTP 400)."""
        self.engine.add_request(req.rid, req.prompt_ids, self.sampling_params(req.params))

    def sampling_params(self, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def on_abort(self, rid: str) -> None:
        self.engine.abort(rid)

    def poll(self) -> None:
        """Advance transfers; called every iteration."""

    def has_pending(self) -> bool:
        """Work outside the engine (queued or in-flight transfers) keeps the loop spinning."""
        return False

    def extra_info(self) -> dict[str, Any]:
        return {}

    def on_output(self, out: Any) -> None:
        self.send(TokenOutput.from_output(out))

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stop_event.is_set():
            busy = self.engine.has_work() or self.has_pending()
            for msg in self.channel.receive(0 if busy else IDLE_POLL_MS):
                self.dispatch(msg)
            self.poll()
            if self.engine.has_work():
                for out in self.engine.step():
                    self.on_output(out)

    def dispatch(self, msg: Any) -> None:
        if isinstance(msg, GenerateRequest):
            try:
                self.on_generate(msg)
            except (ValueError, TypeError) as exc:
                self.send(TokenOutput.failure(msg.rid, str(exc), status=400))
        elif isinstance(msg, AbortRequest):
            self.on_abort(msg.rid)
            # NOTE: ends the request for whoever still waits on it (the HTTP side may not).
            self.send(TokenOutput(msg.rid, finished=True, finish_reason="abort"))
        elif isinstance(msg, ControlRequest):
            self.send(self.control(msg))

    def control(self, msg: ControlRequest) -> ControlReply:
        if msg.op == "server_info":
            return ControlReply(msg.call_id, True, self.server_info())
        if msg.op == "flush_cache":
            return ControlReply(msg.call_id, bool(self.engine.flush_cache()))
        if msg.op == "check_integrity":
            self.engine.check_integrity()
            return ControlReply(msg.call_id, True)
        return ControlReply(msg.call_id, False, {"error": f"unknown op {msg.op!r}"})

    def server_info(self) -> dict[str, Any]:
        engine = self.engine
        sched = engine.scheduler
        return {
            "role": self.role,
            "free_pages": engine.num_free_pages,
            "total_pages": engine.pool.total_pages,
            "page_size": engine.pool.page_size,
            "running": len(sched.running),
            "waiting": len(sched.waiting),
            "held": len(sched.held),
            "max_model_len": engine.max_model_len,
            "uptime_s": round(time.time() - self.started, 1),
            **self.extra_info(),
        }

    def send(self, out: Any) -> None:
        self.channel.send(out)

    def close(self) -> None:
        """Release sockets and transfer engines (the loop has stopped)."""
        self.channel.close()
