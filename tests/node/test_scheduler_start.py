"""The scheduler process a node's HTTP process starts takes the HTTP process's tokenizer: forked
on CPU (every node of the e2e tests starts so), or pickled where it is spawned (CUDA nodes), and
then loads its own when that tokenizer does not pickle. A start that fails says whether a setting
was refused (ValueError: `pdserve` exits 2, which the launcher does not retry) or it crashed."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from decode.loop import DecodeLoop
from engine.options import EngineOptions
from engine.tokenizer import load_tokenizer
from node.process import (
    SchedulerFailed,
    how_it_ended,
    start_method,
    start_scheduler,
    stop_process,
)
from node.settings import NodeSettings
from prefill.loop import PrefillLoop
from transfer.config import TransferConfig


def colocated_decode(path: Path) -> NodeSettings:
    return NodeSettings(
        role="decode",
        model=str(path),
        engine=EngineOptions(dtype="float32", page_size=16, max_total_tokens=1024),
        transfer=TransferConfig(backend="none"),
    )


def test_a_tokenizer_that_does_not_pickle_is_loaded_by_the_scheduler(
    make_tiny,
) -> None:
    path = make_tiny("llama")
    settings = colocated_decode(path)
    tokenizer = load_tokenizer(path)
    tokenizer.not_picklable = lambda: None  # a remote-code tokenizer may hold such things
    assert start_method(settings) == "fork"  # a CPU node's; a CUDA node's is spawned
    scheduler = start_scheduler(
        settings, DecodeLoop, f"pdserve-test-{uuid.uuid4().hex}", tokenizer, method="spawn"
    )
    try:
        assert scheduler.process.is_alive()
        assert scheduler.ready["ok"]
    finally:
        stop_process(scheduler.process)
    assert not scheduler.process.is_alive()


def test_a_setting_the_engine_refuses_is_a_value_error_without_a_traceback(
    make_tiny, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = colocated_decode(make_tiny("llama"))
    engine = dataclasses.replace(settings.engine, device="cuda:99")  # no machine has that GPU
    settings = dataclasses.replace(settings, engine=engine)
    with pytest.raises(ValueError, match=r"^engine.device is 'cuda:99' but") as refused:
        start_scheduler(
            settings, DecodeLoop, f"pdserve-test-{uuid.uuid4().hex}"
        )  # spawned, as a CUDA node's is
    assert not isinstance(refused.value, SchedulerFailed)
    assert "Traceback" not in capfd.readouterr().err  # the node says it in one line


def test_a_scheduler_that_crashes_at_start_keeps_its_traceback(
    make_tiny, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = colocated_decode(make_tiny("llama"))
    with pytest.raises(SchedulerFailed, match="TypeError: PrefillLoop does not run decode nodes"):
        start_scheduler(settings, PrefillLoop, f"pdserve-test-{uuid.uuid4().hex}", method="fork")
    err = capfd.readouterr().err
    assert "scheduler start failed" in err and "Traceback" in err


def test_a_scheduler_killed_outright_points_at_the_oom_killer() -> None:
    assert how_it_ended(-9) == "was killed by SIGKILL (out of memory? the kernel log, dmesg, says)"
    assert how_it_ended(-15) == "was killed by SIGTERM"
    assert how_it_ended(1) == "exited with 1"
