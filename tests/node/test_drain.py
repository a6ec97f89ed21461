"""A node's drain (node/drain.py) over the real channel, with a stand-in scheduler: runs in flight
finish, the ones left at the timeout (or at a second signal) end with a 503 of code "draining" and
are aborted, and a run that starts after the cut is cut at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from api.errors import ApiError
from node.channel import SchedulerClient
from node.drain import Drain, holds_requests
from node.jobs import JobRun
from node.messages import AbortRequest

from .test_channel import StandInScheduler, jobs, run_with

WAIT_S = 10.0  # bounds a wait that ends at once when the drain works


def assert_draining(info: pytest.ExceptionInfo[ApiError]) -> None:
    error = info.value
    assert (error.status, error.type, error.code) == (503, "server_error", "draining")


async def aborted(scheduler: StandInScheduler, rid: str) -> None:
    while not any(isinstance(m, AbortRequest) and m.rid == rid for m in scheduler.seen):
        await asyncio.sleep(0.02)


def test_runs_in_flight_finish_before_the_drain_ends(tmp_path: Path) -> None:
    async def body(client: SchedulerClient, _: StandInScheduler) -> None:
        drain = Drain(timeout_s=60)
        run = JobRun(client, jobs({}, {}), timeout_s=10, drain=drain)
        await run.start()
        drained = asyncio.ensure_future(drain.run(client))
        await asyncio.sleep(0.2)
        assert drain.draining and not drained.done()  # it waits for the run
        await run.rest()
        assert [s.out.token_ids for s in run.ordered] == [[1, 2], [1, 2]]
        await run.close()
        await asyncio.wait_for(drained, WAIT_S)
        assert run.cut_by is None

    run_with(tmp_path, body)


def test_at_the_timeout_what_is_left_is_cut_and_aborted(tmp_path: Path) -> None:
    async def body(client: SchedulerClient, scheduler: StandInScheduler) -> None:
        drain = Drain(timeout_s=0.3)
        run = JobRun(client, jobs({}, {"silent": True}), timeout_s=60, drain=drain)
        await run.start()
        drained = asyncio.ensure_future(drain.run(client))
        with pytest.raises(ApiError) as info:
            await run.rest()
        assert_draining(info)
        assert not drained.done()  # NOTE: it waits for the cut run to close
        await run.close()
        await asyncio.wait_for(aborted(scheduler, "r-1"), WAIT_S)
        await asyncio.wait_for(drained, WAIT_S)
        # a run that starts once the drain cut what it held is cut at once
        late = JobRun(client, jobs({}), timeout_s=60, drain=drain)
        await late.start()
        with pytest.raises(ApiError) as info:
            await late.first_outputs()
        assert_draining(info)
        await late.close()

    run_with(tmp_path, body)


def test_a_second_signal_cuts_at_once(tmp_path: Path) -> None:
    async def body(client: SchedulerClient, _: StandInScheduler) -> None:
        drain = Drain(timeout_s=3600)
        run = JobRun(client, jobs({"silent": True}), timeout_s=60, drain=drain)
        await run.start()
        drained = asyncio.ensure_future(drain.run(client))
        drain.hurry()
        with pytest.raises(ApiError) as info:
            await asyncio.wait_for(run.rest(), WAIT_S)
        assert_draining(info)
        await run.close()
        await asyncio.wait_for(drained, WAIT_S)

    run_with(tmp_path, body)


def test_a_handler_before_its_run_counts_as_in_flight() -> None:
    drain = Drain(timeout_s=1)
    with drain.handling():
        assert drain.busy
    assert not drain.busy


def test_what_the_scheduler_still_holds() -> None:
    idle = {"running": 0, "waiting": 0, "held": 0, "free_pages": 8, "total_pages": 8}
    assert not holds_requests(idle)
    assert holds_requests({**idle, "running": 1})
    assert holds_requests({**idle, "transferring": 1})  # a room in flight
    assert holds_requests({**idle, "prealloc": 1})
    assert holds_requests({**idle, "held": 2, "quarantined": 1})
    # a quarantined room's pages wait for time alone
    assert not holds_requests({**idle, "held": 1, "quarantined": 1})
