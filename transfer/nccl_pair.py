"""The prefill side of one nccl pair: opening it, posting batches, and matching decode's replies.

Batches of one pair go out in one order: a header on the control socket, then the batch's
messages through the group, under one lock, so decode's receives (posted in header order) meet
the sends in the same order. Several batches may be in flight; a reader thread files decode's
replies by batch id and wakes each batch's waiter. Any failure (a send that cannot be posted,
a reply that misses its deadline, the connection closing) breaks the whole pair: every batch in
flight fails with the reason, and the next ``submit`` to the peer opens a fresh pair.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .base import TransferError
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
    pair_store,
    recv_frame,
    send_frame,
)


@dataclass
class Batch:
    """One posted batch; ``done`` is set once decode replied or the pair broke."""

    id: int
    pair: PrefillPair
    messages: list[torch.Tensor]  # alive until the batch is waited for
    staging: torch.Tensor | None = None  # the tensor the first message was cut from, to reuse
    works: list[Any] = field(default_factory=list)
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)


class PrefillPair:
    """A live pair to one decode engine (rank 1 of its group)."""

    def __init__(self, link: Link, name: str) -> None:
        self.link = link
        self.name = name
        self.broken = ""  # why, once broken
        self._post_lock = threading.Lock()  # one header and its sends at a time
        self._lock = threading.Lock()  # _pending and broken
        self._pending: dict[int, Batch] = {}
        self._ids = itertools.count()
        self._reader = threading.Thread(
            target=self._read_replies, name=f"nccl-replies-{name}", daemon=True
        )
        self._reader.start()

    @classmethod
    def open(
        cls,
        address: DecodeAddress,
        store_address: tuple[str, int],
        kind: str,
        host: str,
        device: str,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> PrefillPair:
        """Connect, say hello, build the group with decode (from our own TCPStore at
        ``store_address``); TransferError if it cannot."""
        name = f"{address.host}:{address.port}"
        pair_id = uuid.uuid4().hex
        try:
            sock = socket.create_connection((address.host, address.port), timeout=connect_timeout_s)
        except OSError as e:
            raise TransferError(f"nccl: cannot reach decode {name}: {e}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_frame(sock, PairHello(PAIR_VERSION, pair_id, kind, *store_address))
            welcome = recv_frame(sock)
            if not isinstance(welcome, PairWelcome) or welcome.error:
                raise LinkError(getattr(welcome, "error", "") or "no welcome")
            store = pair_store(*store_address, pair_id, connect_timeout_s)
            group = build_group(kind, store, 1, host, connect_timeout_s, timeout_s)
        except (LinkError, OSError, RuntimeError) as e:
            sock.close()
            raise TransferError(
                f"nccl: cannot open a {kind} pair with decode {name}: {e}"
            ) from None
        # NOTE: sends give up after timeout_s (a decode that stops reading must not hold a
        # writer forever); the reader treats the timeout as idleness between replies
        sock.settimeout(timeout_s)
        return cls(Link(sock, group, kind, 1, device), name)

    def post(self, dst: np.ndarray, lengths: np.ndarray, staged: int, messages: list) -> Batch:
        """Send one batch: its header, then its messages (TransferError if the pair broke)."""
        with self._post_lock:
            with self._lock:
                if self.broken:
                    raise TransferError(self.broken)
                batch = Batch(next(self._ids), self, messages)
                self._pending[batch.id] = batch
            header = BatchHeader(batch.id, _wire(dst), _wire(lengths), staged)
            try:
                send_frame(self.link.sock, header)
                for message in messages:
                    batch.works.append(self.link.send(message))
            except (OSError, RuntimeError, LinkError) as e:
                self.close(f"nccl: sending to decode {self.name} failed: {e}")
                raise TransferError(self.broken) from None
        return batch

    def wait(self, batch: Batch, deadline: float) -> str:
        """ "" once decode confirmed ``batch``; else why not (by ``deadline`` at the latest)."""
        if not batch.done.wait(max(0.0, deadline - time.monotonic())):
            self.close(f"nccl: decode {self.name} did not confirm a batch before the deadline")
            return "nccl batch timed out"
        if batch.error and self.broken:
            return batch.error
        try:  # decode received every message (even of a refused batch): the sends are done
            self.link.finish(batch.works, deadline)
        except LinkError as e:
            self.close(f"nccl: decode {self.name}: {e}")
            return self.broken
        return batch.error

    def close(self, reason: str) -> None:
        """Break the pair: fail every batch in flight with ``reason``, free the group."""
        with self._lock:
            if self.broken:
                return
            self.broken = reason
            pending = list(self._pending.values())
            self._pending.clear()
        for batch in pending:
            batch.error = reason
            batch.done.set()
        self.link.close()

    def join(self, timeout_s: float) -> None:
        if self._reader is not threading.current_thread():
            self._reader.join(timeout_s)

    def _read_replies(self) -> None:
        try:
            while True:
                reply = recv_frame(self.link.sock, idle_ok=True)
                if not isinstance(reply, BatchReply):
                    raise LinkError(f"expected a BatchReply, got {type(reply).__name__}")
                with self._lock:
                    batch = self._pending.pop(reply.batch, None)
                if batch is not None:
                    batch.error = reply.error
                    batch.done.set()
        except LinkError as e:
            self.close(f"nccl: decode {self.name}: {e}")


def _wire(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<u8").tobytes()
