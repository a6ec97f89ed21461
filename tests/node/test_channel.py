"""The ZMQ channel between a node's HTTP process and its scheduler process, over real ipc://
sockets, and one HTTP request's jobs riding on it (JobRun): outputs reach their request, errors
and timeouts end it, and what is left is aborted on the scheduler."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from api.errors import ApiError
from node.channel import SchedulerChannel, SchedulerClient
from node.jobs import JobRun
from node.messages import (
    AbortRequest,
    ControlReply,
    ControlRequest,
    GenerateRequest,
    TokenOutput,
)
from node.requests import Job

Reply = Callable[[Any], list[Any]]


class StandInScheduler:
    """The scheduler's end in a thread: answers each message with what `reply` returns."""

    def __init__(self, requests: str, outputs: str, reply: Reply) -> None:
        self.channel = SchedulerChannel(requests, outputs)
        self.reply = reply
        self.seen: list[Any] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            for msg in self.channel.receive(20):
                self.seen.append(msg)
                for out in self.reply(msg):
                    self.channel.send(out)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.channel.close()


Body = Callable[[SchedulerClient, StandInScheduler], Awaitable[None]]


def run_with(tmp_path: Path, body: Body) -> None:
    """`body(client, scheduler)` in a fresh event loop, the two ends joined over ipc://."""
    requests, outputs = f"ipc://{tmp_path}/requests", f"ipc://{tmp_path}/outputs"

    async def main() -> None:
        client = SchedulerClient(requests, outputs)
        client.start()
        scheduler = StandInScheduler(requests, outputs, answer)
        try:
            await body(client, scheduler)
        finally:
            scheduler.close()
            await client.stop()

    asyncio.run(main())


def answer(msg: Any) -> list[Any]:
    """Two deltas per request; a reply per control call but `hang`; nothing for aborts."""
    if isinstance(msg, GenerateRequest):
        if msg.params.get("fail"):
            return [TokenOutput.failure(msg.rid, "bad request here", 400)]
        if msg.params.get("silent"):
            return []
        return [
            TokenOutput(msg.rid, [1], "a", prompt_tokens=2, completion_tokens=1),
            TokenOutput("someone-else", [9], "z"),  # a request nobody waits for: dropped
            TokenOutput(msg.rid, [2], "b", True, "length", completion_tokens=2),
        ]
    if isinstance(msg, ControlRequest) and msg.op != "hang":
        return [ControlReply(msg.call_id, True, {"op": msg.op})]
    return []


def jobs(*params: dict[str, Any]) -> list[Job]:
    return [Job(i, i, GenerateRequest(f"r-{i}", [5, 6], p)) for i, p in enumerate(params)]


def test_outputs_reach_their_request_and_add_up(tmp_path: Path) -> None:
    async def body(client: SchedulerClient, _: StandInScheduler) -> None:
        run = JobRun(client, jobs({}, {}), timeout_s=10)
        await run.start()
        await run.rest()
        assert [(s.out.token_ids, s.out.text, s.out.finish_reason) for s in run.ordered] == [
            ([1, 2], "ab", "length"),
            ([1, 2], "ab", "length"),
        ]
        await run.close()
        assert client.open_rids() == []

    run_with(tmp_path, body)


def test_control_calls_are_answered_or_time_out(tmp_path: Path) -> None:
    async def body(client: SchedulerClient, _: StandInScheduler) -> None:
        reply = await client.call("server_info")
        assert reply.ok and reply.data == {"op": "server_info"}
        with pytest.raises(TimeoutError):
            await client.call("hang", timeout_s=0.2)

    run_with(tmp_path, body)


def test_an_error_output_fails_the_request_with_its_status(tmp_path: Path) -> None:
    async def body(client: SchedulerClient, _: StandInScheduler) -> None:
        run = JobRun(client, jobs({"fail": True}), timeout_s=10)
        await run.start()
        with pytest.raises(ApiError) as info:
            await run.first_outputs()
        assert (info.value.status, info.value.message) == (400, "bad request here")
        await run.close()

    run_with(tmp_path, body)


def test_a_silent_scheduler_times_out_and_the_jobs_left_are_aborted(tmp_path: Path) -> None:
    async def body(client: SchedulerClient, scheduler: StandInScheduler) -> None:
        run = JobRun(client, jobs({}, {"silent": True}), timeout_s=0.5)
        await run.start()
        with pytest.raises(ApiError) as info:
            await run.rest()
        assert info.value.status == 504 and info.value.code == "timeout"
        await run.close()
        for _ in range(250):
            if any(isinstance(m, AbortRequest) for m in scheduler.seen):
                break
            await asyncio.sleep(0.02)
        aborted = [m.rid for m in scheduler.seen if isinstance(m, AbortRequest)]
        assert aborted == ["r-1"]  # r-0 finished: nothing to abort there

    run_with(tmp_path, body)


def test_a_request_id_in_flight_twice_is_refused(tmp_path: Path) -> None:
    async def body(client: SchedulerClient, _: StandInScheduler) -> None:
        client.open("dup")
        with pytest.raises(ValueError, match="already in flight"):
            client.open("dup")

    run_with(tmp_path, body)
