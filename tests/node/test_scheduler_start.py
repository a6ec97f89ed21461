"""The scheduler process a node's HTTP process starts takes the HTTP process's tokenizer: forked
on CPU (every node of the e2e tests starts so), or pickled where it is spawned (CUDA nodes), and
then loads its own when that tokenizer does not pickle."""

from __future__ import annotations

from pathlib import Path

from decode.loop import DecodeLoop
from engine.options import EngineOptions
from engine.tokenizer import load_tokenizer
from node.process import start_method, start_scheduler, stop_process
from node.settings import NodeSettings
from transfer.config import TransferConfig


def test_a_tokenizer_that_does_not_pickle_is_loaded_by_the_scheduler(
    make_tiny, tmp_path: Path
) -> None:
    path = make_tiny("llama")
    settings = NodeSettings(
        role="decode",
        model=str(path),
        engine=EngineOptions(dtype="float32", page_size=16, max_total_tokens=1024),
        transfer=TransferConfig(backend="none"),
    )
    tokenizer = load_tokenizer(path)
    tokenizer.not_picklable = lambda: None  # a remote-code tokenizer may hold such things
    assert start_method(settings) == "fork"  # a CPU node's; a CUDA node's is spawned
    scheduler = start_scheduler(settings, DecodeLoop, str(tmp_path), tokenizer, method="spawn")
    try:
        assert scheduler.process.is_alive()
        assert scheduler.ready["ok"]
    finally:
        stop_process(scheduler.process)
    assert not scheduler.process.is_alive()
