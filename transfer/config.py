"""Transfer settings: one frozen dataclass shared by the prefill and decode sides."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def setting(default: Any, help: str) -> Any:
    """A field with its help text (docs/CONFIG.md is written from these)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TransferConfig:
    """How a node moves KV pages and how long it waits for each step.

    Every waiting state has a timeout: BOOTSTRAPPING (the peer has not shown up),
    WAITING_FOR_INPUT (prefill has not produced the KV yet), TRANSFERRING (the write has not
    finished). ``abort_timeout_s`` bounds how long decode waits for prefill to confirm that it
    stopped writing into an aborted room; past it (or when prefill goes silent mid-room) decode
    fails the room at once but holds its pages ``quarantine_s`` longer before reusing them, so
    a prefill that hung rather than died cannot land a late write in another request's pages.
    """

    backend: str = setting(
        "mooncake",
        "mooncake, nixl or nccl (torch.distributed: NCCL on GPU, gloo on CPU); none: a decode "
        "node that only prefills itself",
    )
    host: str = setting("127.0.0.1", "this node's address for the engine and the bootstrap server")
    protocol: str = setting("tcp", "Mooncake's transport: tcp or rdma (NIXL's UCX picks its own)")
    device: str = setting("", "Mooncake rdma: comma-separated NIC names (empty: all)")
    bootstrap_port: int = setting(0, "prefill: the bootstrap server's port (0: any free port)")
    bootstrap_timeout_s: float = setting(30.0, "a room waits this long for its peer to show up")
    waiting_timeout_s: float = setting(300.0, "... for prefill to produce the KV")
    transfer_timeout_s: float = setting(60.0, "... for the write to finish")
    abort_timeout_s: float = setting(
        10.0, "... for prefill to confirm it stopped writing an aborted room"
    )
    quarantine_s: float = setting(
        30.0,
        "decode holds the pages of a room prefill never confirmed it stopped writing this long "
        "(it went silent or ignored an abort); 0 reuses them at once",
    )
    heartbeat_interval_s: float = setting(1.0, "decode heartbeats each prefill peer this often")
    heartbeat_timeout_s: float = setting(6.0, "a peer silent this long is dead: its rooms fail")
    max_batch_descriptors: int = setting(
        0, "descriptors per engine batch (0: the backend's default)"
    )
    max_inflight_batches: int = setting(4, "batches of one room submitted at once")
    num_workers: int = setting(
        2, "prefill: rooms written at once to one decode (threads grow past a hung decode)"
    )
    meta_slots: int = setting(1024, "decode: rooms that can be open at once")
    meta_slot_bytes: int = setting(2048, "a room's metadata block (first token, top logprobs)")
    mooncake_tcp_lanes: int = setting(0, "MC_TCP_LANES_PER_PEER (0: Mooncake's default, 4)")
    nixl_threads: int = setting(
        2,
        "NIXL: UCX worker threads per engine; a batch's descriptors are split among them "
        "(0: NIXL's default of one). Scattered 64-token pages went from 0.76 to 1.25x the "
        "rate of one contiguous write with 2 (docs/BENCHMARKS.md)",
    )
    nixl_progress_delay_us: int = setting(
        1000,
        "NIXL: its progress thread sleeps on the UCX workers' events and wakes at least this "
        "often (microseconds); 0: NIXL's own default, a thread that polls without pause and "
        "keeps a whole core busy in every process, idle or not",
    )
    fault_fraction: float = setting(
        0.0,
        "testing only: prefill fails this fraction (0 to 1) of its rooms on purpose instead of "
        "sending their KV, through the real failure path (seeded per node)",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_s") and value <= 0 and f.name != "quarantine_s":
                raise ValueError(f"{f.name} must be > 0, got {value}")
        if self.quarantine_s < 0:
            raise ValueError(f"quarantine_s must be >= 0, got {self.quarantine_s}")
        if self.protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol must be tcp or rdma, got {self.protocol!r}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s must exceed heartbeat_interval_s "
                f"({self.heartbeat_timeout_s} <= {self.heartbeat_interval_s})"
            )
        for name in ("nixl_threads", "nixl_progress_delay_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_inflight_batches", "num_workers", "meta_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.fault_fraction <= 1.0:
            raise ValueError(
                f"fault_fraction must be between 0 and 1 (the fraction of rooms to fail on "
                f"purpose), got {self.fault_fraction}"
            )
        if self.meta_slot_bytes < 256:
            raise ValueError(f"meta_slot_bytes must be >= 256, got {self.meta_slot_bytes}")

    def timeout_for(self, state_name: str) -> tuple[float, str]:
        """(seconds, setting name) bounding how long a room may stay in ``state_name``."""
        name = {
            "BOOTSTRAPPING": "bootstrap_timeout_s",
            "WAITING_FOR_INPUT": "waiting_timeout_s",
            "TRANSFERRING": "transfer_timeout_s",
        }[state_name]
        return getattr(self, name), name
