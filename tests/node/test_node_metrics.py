"""A node's /metrics text: transfers (rooms by outcome, bytes, each room's time) as the scheduler
process reports them, time per output token, and the start time that counts restarts."""

from __future__ import annotations

import re

import msgpack

from node.metrics import NodeMetrics, TransferStats
from node.settings import NodeSettings
from transfer import ABORTED_BY_CLIENT, DECLINED, RoomStatus, TransferState
from transfer.base import TransferMetrics


def sample(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    assert found, f"no {name} in\n{text}"
    return float(found.group(1))


def test_transfers_tpot_and_start_time_are_exported() -> None:
    stats = TransferStats()
    done = TransferMetrics(bytes=4096, descriptors=4, batches=1, duration_s=0.003)
    stats.observe(RoomStatus(1, TransferState.SUCCESS, metrics=done))
    stats.observe(RoomStatus(2, TransferState.SUCCESS, metrics=done))
    stats.observe(RoomStatus(3, TransferState.FAILED, "peer gone"))
    # neither is a failure: decode prefilled the request itself; the client went away
    stats.observe(RoomStatus(4, TransferState.FAILED, f"{DECLINED}: it prefills locally"))
    stats.observe(RoomStatus(5, TransferState.FAILED, ABORTED_BY_CLIENT))
    # the info crosses from the scheduler process as msgpack
    info = msgpack.unpackb(msgpack.packb({"transfer": stats.info(), "started": 1700000000.5}))
    text = NodeMetrics().render(info, NodeSettings(role="prefill", model="/m"))
    assert re.search(r'pdserve_node_transfer_rooms_total\{[^}]*state="success"\} 2$', text, re.M)
    for state, n in (("failed", 1), ("declined", 1), ("aborted", 1)):
        found = rf'pdserve_node_transfer_rooms_total\{{[^}}]*state="{state}"\}} {n}$'
        assert re.search(found, text, re.M), state
    assert sample(text, "pdserve_node_transfer_bytes_total") == 8192
    assert sample(text, "pdserve_node_transfer_seconds_count") == 2
    assert re.search(r'pdserve_node_transfer_seconds_bucket\{[^}]*le="0.005"\} 2$', text, re.M)
    assert sample(text, "pdserve_node_start_time_seconds") == 1700000000.5


def test_time_per_output_token_is_the_decode_time_over_the_tokens_after_the_first() -> None:
    class Out:
        prompt_tokens, completion_tokens, cached_tokens = 5, 11, 0

    class State:
        out = Out()

    metrics = NodeMetrics()
    metrics.observe_done(0.2, 1.2, [State()])  # 1.0 s for the 10 tokens after the first
    text = metrics.render({}, NodeSettings(role="decode", model="/m"))
    assert sample(text, "pdserve_node_time_per_output_token_seconds_sum") == 0.1
    assert sample(text, "pdserve_node_time_per_output_token_seconds_count") == 1


def test_every_family_says_what_it_counts() -> None:
    metrics = NodeMetrics()
    info = {"transfer": TransferStats().info(), "started": 1.0, "free_pages": 3, "held": 2}
    info |= {"prealloc": 0, "transferring": 1, "quarantined": 1}  # a decode node's
    text = metrics.render(info, NodeSettings(role="prefill", model="/m"))
    typed = re.findall(r"^# TYPE (\S+) ", text, re.M)
    helped = re.findall(r"^# HELP (\S+) ", text, re.M)
    assert len(typed) >= 15 and helped == typed
    assert sample(text, "pdserve_node_quarantined") == 1
