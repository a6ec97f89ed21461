"""One prefill-decode pair of the nccl engine: a control socket and a 2-rank process group.

The control socket carries typed msgpack frames (a 4-byte length, then the message): the hello
that opens a pair, then per batch a header (prefill -> decode) and a reply (decode -> prefill).
The process group carries only the bytes, as point-to-point messages; decode posts its receives
when a header arrives, so no receive ever waits on an idle pair. That matters because a gloo
receive cannot be cancelled, only timed out, and a timed-out gloo wait closes the whole pair;
the control socket, by contrast, can always be shut down to wake whoever reads it.

The group is built from a TCPStore under a prefix unique to the pair (never the process's
default group: a node may have its own torch.distributed world for tensor parallelism), so a
pair rebuilt after a peer restart meets nobody from the old one. The prefill engine hosts that
store, not decode: a TCPStore client cannot be bounded when the server's process is stopped
(SIGSTOP: the connect is accepted, then nothing answers; measured: no return within 120 s
despite a 2 s timeout), and prefill's writer threads must never block unbounded on one decode.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .codec import MessageCodec

PAIR_VERSION = 1
_FRAME = struct.Struct("!I")
_MAX_FRAME = 256 << 20


class LinkError(RuntimeError):
    """The pair is broken: its peer went away, timed out or spoke nonsense."""


@dataclass(frozen=True)
class DecodeAddress:
    """Where a decode engine listens for pairs (the Endpoint blob), and the identity of the GPU
    its KV lives on ("" on CPU)."""

    host: str
    port: int
    gpu: str = ""


@dataclass(frozen=True)
class PairHello:
    """Prefill opens a pair: the group's kind ("gloo" or "nccl"), and the TCPStore (prefill's)
    and key prefix to build it from."""

    version: int
    pair: str
    group: str
    store_host: str
    store_port: int


@dataclass(frozen=True)
class PairWelcome:
    """Decode's answer to the hello; an empty error means: build the group now."""

    error: str


@dataclass(frozen=True)
class BatchHeader:
    """A batch of ranges to write (addresses and lengths as little-endian uint64 bytes).

    The first ``staged`` ranges arrive back to back in one message; every later range arrives
    as a message of its own, straight into its destination.
    """

    batch: int
    dst: bytes
    lengths: bytes
    staged: int


@dataclass(frozen=True)
class BatchReply:
    """Decode wrote the batch (empty error) or refused it (the reason)."""

    batch: int
    error: str


CODEC = MessageCodec(
    (DecodeAddress, PairHello, PairWelcome, BatchHeader, BatchReply), error=LinkError
)


def send_frame(sock: socket.socket, msg: Any) -> None:
    data = CODEC.encode(msg)
    sock.sendall(_FRAME.pack(len(data)) + data)


def recv_frame(sock: socket.socket, *, idle_ok: bool = False) -> Any:
    """The next message; LinkError once the connection is closed or broken. A socket timeout
    before the frame's first byte is only idleness when ``idle_ok``: it waits on."""
    while True:
        try:
            head = _recv_exactly(sock, _FRAME.size, idle_ok)
            break
        except _Idle:
            continue
    (length,) = _FRAME.unpack(head)
    if length > _MAX_FRAME:
        raise LinkError(f"control frame of {length} bytes (protocol mismatch?)")
    return CODEC.decode(_recv_exactly(sock, length, False))


class _Idle(Exception):
    """No byte of the next frame came within the socket's timeout."""


def _recv_exactly(sock: socket.socket, size: int, idle_ok: bool) -> bytes:
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            if idle_ok and got == 0:
                raise _Idle from None
            raise LinkError("control connection timed out mid-message") from None
        except OSError as e:
            raise LinkError(f"control connection failed: {e}") from None
        if n == 0:
            raise LinkError("control connection closed by the peer")
        got += n
    return bytes(data)


def pair_store(host: str, port: int, pair: str, timeout_s: float) -> dist.Store:
    """A fresh client of the TCPStore at ``host:port``, under the pair's own key prefix."""
    client = dist.TCPStore(
        host, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )
    return dist.PrefixStore(f"pdserve-nccl/{pair}/", client)


def group_kind(local_device: str, peer_device: str, same_gpu: bool = False) -> str:
    """NCCL when both ends hold their KV on CUDA, on two GPUs; gloo otherwise (through CPU
    staging): NCCL refuses a communicator whose two ranks share a GPU ("Duplicate GPU")."""
    both_cuda = local_device != "cpu" and peer_device != "cpu"
    return "nccl" if both_cuda and not same_gpu else "gloo"


def gpu_identity(device: str) -> str:
    """The GPU behind `device`, the same string in every process that sees it (its UUID,
    whatever CUDA_VISIBLE_DEVICES numbers it as); "" on CPU."""
    if device == "cpu":
        return ""
    props = torch.cuda.get_device_properties(torch.device(device))
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return str(uuid)
    return f"{socket.gethostname()}/{getattr(props, 'pci_bus_id', device)}"


def build_group(
    kind: str, store: dist.Store, rank: int, host: str, connect_timeout_s: float, timeout_s: float
) -> Any:
    """A 2-rank process group from ``store`` alone (blocks until the other rank joins, for
    ``connect_timeout_s`` at most on gloo)."""
    if kind == "gloo":
        options = dist.ProcessGroupGloo._Options()
        # the rendezvous' bound; every wait of ours on the group passes its own deadline
        options._timeout = timedelta(seconds=connect_timeout_s)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, 2, options)
    if not hasattr(dist, "ProcessGroupNCCL"):
        raise LinkError("this torch build has no NCCL (KV on CUDA needs a CUDA build of torch)")
    options = dist.ProcessGroupNCCL.Options()
    # NOTE: our own deadlines abort a stuck pair first; NCCL's watchdog, whose default on a
    # timed-out op is to end the whole process, stays out of the way
    options._timeout = timedelta(seconds=4 * timeout_s)
    # NOTE: and on an error (a peer that died mid-transfer) the watchdog's default (3) ends the
    # whole process too, racing our own abort of the pair; 2 aborts the pair's communicator and
    # leaves its works failed, which fails the pair's rooms alone. torch reads it as the group
    # is made.
    with _environ(ASYNC_ERROR_HANDLING, "2"):
        return dist.ProcessGroupNCCL(store, rank, 2, options)


ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` in the block, as before after (unset if it was)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class Link:
    """A live pair: frames on the socket, bytes through the group, every wait bounded.

    ``close`` may come from any thread: it wakes a thread blocked reading the socket or waiting
    for one of the group's operations, and fails every operation in flight at both ends.
    """

    def __init__(self, sock: socket.socket, group: Any, kind: str, rank: int, device: str):
        self.sock = sock
        self.group = group
        self.kind = kind
        self.device = device if kind == "nccl" else "cpu"  # where the group's bytes must live
        self.closed = False
        self._peer = 1 - rank
        self._inflight: dict[int, Any] = {}  # id -> work, until finished
        self._lock = threading.Lock()

    def send(self, data: torch.Tensor) -> Any:
        return self._track(self.group.send([data], self._peer, 0))

    def recv(self, data: torch.Tensor) -> Any:
        return self._track(self.group.recv([data], self._peer, 0))

    def finish(self, works: Sequence[Any], deadline: float) -> None:
        """Wait for ``works`` until ``deadline``; LinkError if one failed or the link closed."""
        try:
            for work in works:
                if self.kind == "nccl":
                    self._poll(work, deadline)
                else:  # gloo: only wait() completes an op; it blocks in C++, GIL released
                    work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
                with self._lock:
                    self._inflight.pop(id(work), None)
        except (RuntimeError, TimeoutError) as e:
            raise LinkError(f"{self.kind} transfer failed: {e}") from None

    def close(self) -> None:
        """Tear the pair down (idempotent)."""
        with self._lock:
            self.closed = True
            works, self._inflight = list(self._inflight.values()), {}
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self.kind == "gloo":
            # NOTE: gloo's abort() wakes nothing, but a wait that times out closes the pair,
            # which fails every op on it, at both ends and in every waiting thread, at once
            for work in works:
                with contextlib.suppress(Exception):
                    work.wait(timedelta(milliseconds=1))
        with contextlib.suppress(Exception):
            self.group.abort()

    def _track(self, work: Any) -> Any:
        with self._lock:
            if self.closed:
                raise LinkError("the pair is closed")
            self._inflight[id(work)] = work
        return work

    def _poll(self, work: Any, deadline: float) -> None:
        # NCCL: wait() would not block the CPU, only order the current stream after the op
        pause = 20e-6
        while not work.is_completed():
            if self.closed:
                raise LinkError("the pair was closed")
            if time.monotonic() > deadline:
                raise TimeoutError("no progress before the deadline")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        work.wait()  # raises the op's error, if it had one
