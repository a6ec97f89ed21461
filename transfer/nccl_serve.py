"""The decode side of the nccl engine: accepts prefill pairs and writes their batches.

It listens on one port of ``transfer.host``; each accepted connection is one pair, served by
its own thread::

    prefill                                  decode (thread of this pair)
      PairHello(pair id, gloo | nccl,   ->
                prefill's TCPStore)     <-   PairWelcome(error="")
      both build the 2-rank group from that store, prefix pdserve-nccl/<pair id>/
      BatchHeader(dst, lengths, staged) ->   checks every range lies in registered memory
      bytes: staged ranges, then each   =>   receives them (staging, or straight into place)
             other range on its own          scatters the staging into place
                                        <-   BatchReply(error="" or why it was refused)

A refused batch is still received (into scratch memory), so the pair stays usable. The thread
ends when prefill closes the connection (it left, died, or gave up on the pair), when a
transfer fails or stalls past ``timeout_s``, or when the engine closes.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

import numpy as np
import torch

from .nccl_link import (
    PAIR_VERSION,
    BatchHeader,
    BatchReply,
    DecodeAddress,
    Link,
    LinkError,
    PairHello,
    PairWelcome,
    build_group,
    gpu_identity,
    pair_store,
    recv_frame,
    send_frame,
)
from .nccl_memory import RegionMap, StagingPool

log = logging.getLogger(__name__)

KEEP_STAGING_BYTES = 128 << 20  # per pair; a batch stages about 64 MiB at most (nccl.py)


class PairServer:
    """Serves every prefill pair of one decode engine; ``close`` stops all of them."""

    def __init__(
        self, host: str, regions: RegionMap, timeout_s: float, connect_timeout_s: float
    ) -> None:
        self._host = host
        self._regions = regions
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._listener = socket.create_server((host, 0))
        port = self._listener.getsockname()[1]
        self.address = DecodeAddress(host, port, gpu_identity(regions.device))
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._links: set[Link] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="nccl-accept", daemon=True)
        self._acceptor.start()

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop accepting and end every pair, waiting at most ``timeout_s`` for their threads.

        NOTE: gloo wakes no waiter of a receive that was mid-message when its pair closed; such
        a thread stays (daemon) until its own deadline, ``timeout_s`` of the engine, and writes
        nothing more: its pair is gone."""
        with self._lock:
            self._closed = True
            conns, links, threads = list(self._conns), list(self._links), list(self._threads)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for link in links:
            link.close()
        deadline = time.monotonic() + timeout_s
        for thread in [self._acceptor, *threads]:
            thread.join(max(0.0, deadline - time.monotonic()))

    def live_pairs(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._threads)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        link: Link | None = None
        try:
            link = self._open(conn)
            with self._lock:
                if self._closed:
                    raise LinkError("decode engine closed")
                self._links.add(link)
            staging = StagingPool(KEEP_STAGING_BYTES)
            while True:
                header = recv_frame(conn)
                if not isinstance(header, BatchHeader):
                    raise LinkError(f"expected a BatchHeader, got {type(header).__name__}")
                error = self._receive(link, header, staging)
                send_frame(conn, BatchReply(header.batch, error))
        except (LinkError, OSError) as e:
            log.debug("nccl pair from %s ended: %s", _peer_name(conn), e)
        except Exception:
            log.exception("nccl pair from %s crashed", _peer_name(conn))
        finally:
            with self._lock:
                self._conns.discard(conn)
                if link is not None:
                    self._links.discard(link)
            if link is not None:
                link.close()
            conn.close()

    def _open(self, conn: socket.socket) -> Link:
        conn.settimeout(self._connect_timeout_s)
        hello = recv_frame(conn)
        if not isinstance(hello, PairHello):
            raise LinkError(f"expected a PairHello, got {type(hello).__name__}")
        error = self._hello_error(hello)
        send_frame(conn, PairWelcome(error))
        if error:
            raise LinkError(error)
        # NOTE: blocks while prefill is stopped (see nccl_link.py); only this pair's thread
        store = pair_store(hello.store_host, hello.store_port, hello.pair, self._connect_timeout_s)
        group = build_group(
            hello.group, store, 0, self._host, self._connect_timeout_s, self._timeout_s
        )
        conn.settimeout(None)
        return Link(conn, group, hello.group, 0, self._regions.device)

    def _hello_error(self, hello: PairHello) -> str:
        if hello.version != PAIR_VERSION:
            return (
                f"nccl pair version differs: prefill {hello.version}, decode {PAIR_VERSION} "
                "(run the same pdserve version on both)"
            )
        if hello.group == "nccl" and self._regions.device == "cpu":
            return "prefill asked for an NCCL pair, but this decode holds its KV on CPU"
        if hello.group not in ("gloo", "nccl"):
            return f"unknown group kind {hello.group!r}"
        return ""

    def _receive(self, link: Link, header: BatchHeader, staging: StagingPool) -> str:
        dst = np.frombuffer(header.dst, "<u8")
        lengths = np.frombuffer(header.lengths, "<u8")
        if len(dst) != len(lengths) or not 0 <= header.staged <= len(dst):
            raise LinkError(f"malformed header of batch {header.batch}")
        try:
            index, error = self._regions.locate(dst, lengths), ""
        except ValueError as e:
            index, error = None, f"decode refused batch {header.batch}: {e}"
        staged = header.staged
        nbytes = int(lengths[:staged].sum())
        whole = staging.take(nbytes, link.device)
        buffer = whole[:nbytes]
        works = [link.recv(buffer)] if nbytes else []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, received)
        for i in range(staged, len(dst)):
            length = int(lengths[i])
            target = (
                None if index is None else self._regions.view(int(dst[i]), length, int(index[i]))
            )
            if target is None or target.device != torch.device(link.device):
                received = torch.empty(length, dtype=torch.uint8, device=link.device)
                if target is not None:
                    copies.append((target, received))
                target = received
            works.append(link.recv(target))
        link.finish(works, time.monotonic() + self._timeout_s)
        if index is not None:
            self._regions.scatter(dst[:staged], lengths[:staged], index[:staged], buffer)
            for target, received in copies:
                target.copy_(received)
            _synchronize(self._regions.device)
        staging.give(whole)
        return error


def _synchronize(device: str) -> None:
    """Bytes are in place before decode says so (CUDA copies run on the current stream)."""
    if device != "cpu":
        torch.cuda.current_stream(torch.device(device)).synchronize()


def _peer_name(conn: socket.socket) -> Any:
    with contextlib.suppress(OSError):
        return conn.getpeername()
    return "?"
