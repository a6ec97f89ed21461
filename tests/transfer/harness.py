"""Transfer test harness: tiny KV layouts, a page pool that catches double frees, a prefill
side in the test process and a decode node in a child process (multiprocessing spawn).

The parent talks to the child over a multiprocessing pipe (test plumbing only; the nodes
themselves talk over ZMQ + msgpack and move bytes through the real engine).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import replace
from typing import Any

import numpy as np

from transfer import KVBuffer, KVCompat, KVReceiver, KVSender, RoomStatus, TransferConfig

PAGE_TOKENS = 4
# layout name -> (arrays per node, compat); "mha_bad" has MHA buffers but claims 64-token pages.
LAYOUTS = ("mha", "mla", "page_major", "mha_bad")


def make_layout(kind: str, num_pages: int, seed: int | None) -> tuple[list[np.ndarray], KVCompat]:
    """Per-buffer page views (first axis = page) and the compat a node with them announces."""
    if kind in ("mha", "mha_bad"):  # 2 layers x (K, V), [pages, tokens, heads, dim]
        views = [np.zeros((num_pages, PAGE_TOKENS, 2, 16), np.float16) for _ in range(4)]
    elif kind == "mla":  # 2 layers x latent, [pages, tokens, lora + rope]
        views = [np.zeros((num_pages, PAGE_TOKENS, 40), np.float16) for _ in range(2)]
    elif kind == "page_major":  # one [pages, layers, kv, tokens, heads, dim] pool, strided views
        whole = np.zeros((num_pages, 2, 2, PAGE_TOKENS, 2, 16), np.float16)
        views = [whole[:, layer, kv] for layer in range(2) for kv in range(2)]
    else:
        raise ValueError(kind)
    if seed is not None:
        rng = np.random.default_rng(seed)
        for v in views:
            v[...] = rng.integers(0, 1 << 16, v.shape, dtype=np.uint16).view(np.float16)
    page_size = 64 if kind == "mha_bad" else PAGE_TOKENS
    compat = KVCompat("tiny", "float16", page_size, 2, "mla" if kind == "mla" else "mha")
    return views, compat


def digest(views: list[np.ndarray], pages: list[int]) -> str:
    h = hashlib.sha256()
    for v in views:
        h.update(np.ascontiguousarray(v[pages]).tobytes())
    return h.hexdigest()


class PagePool:
    """Which room owns which page; freeing a page twice or leaking one fails the test."""

    def __init__(self, num_pages: int, seed: int = 0) -> None:
        self.num_pages = num_pages
        self.free = set(range(num_pages))
        self.owned: dict[int, list[int]] = {}
        self._rng = np.random.default_rng(seed)

    def alloc(self, room: int, count: int, contiguous: bool = False) -> list[int]:
        assert room not in self.owned, f"room {room} already owns pages"
        free = sorted(self.free)
        assert len(free) >= count, f"pool exhausted: {len(free)} free, {count} asked"
        if contiguous:
            pages = free[:count]
        else:
            pages = [int(p) for p in self._rng.choice(free, size=count, replace=False)]
        self.free.difference_update(pages)
        self.owned[room] = pages
        return pages

    def release(self, room: int) -> None:
        pages = self.owned.pop(room)  # KeyError: released twice
        assert self.free.isdisjoint(pages), f"room {room}: page freed twice"
        self.free.update(pages)

    def problems(self) -> list[str]:
        out = [f"room {r} still owns {len(p)} pages" for r, p in self.owned.items()]
        if len(self.free) + sum(map(len, self.owned.values())) != self.num_pages:
            out.append("page accounting broken")
        return out


class Side:
    """One node's transfer objects per layout, its pages and its finished rooms."""

    def __init__(self, num_pages: int, seed: int | None) -> None:
        self.views: dict[str, list[np.ndarray]] = {}
        self.pool = PagePool(num_pages, seed or 0)
        self.layout_of: dict[int, str] = {}
        self.finished: dict[int, RoomStatus] = {}
        self.digests: dict[int, str] = {}

    def collect(self, endpoints: dict[str, Any]) -> None:
        """Pop finished rooms, record them, free their pages (exactly once)."""
        for layout, end in endpoints.items():
            for status in end.pop_finished():
                room = status.room
                assert room not in self.finished, f"room {room} finished twice"
                assert self.layout_of[room] == layout
                self.finished[room] = status
                self.digests[room] = digest(self.views[layout], self.pool.owned[room])
                self.pool.release(room)

    def wait(self, endpoints: dict[str, Any], rooms: list[int], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            self.collect(endpoints)
            if all(r in self.finished for r in rooms) or time.monotonic() > deadline:
                return {r: self.finished[r] for r in rooms if r in self.finished}
            time.sleep(0.002)


class PrefillSide(Side):
    """Prefill senders (one per layout) living in the test process."""

    def __init__(
        self, config: TransferConfig, num_pages: int, layouts=("mha", "mla", "page_major")
    ):
        super().__init__(num_pages, seed=1)
        self.senders: dict[str, KVSender] = {}
        for i, kind in enumerate(layouts):
            views, compat = make_layout(kind, num_pages, seed=100 + i)
            self.views[kind] = views
            self.senders[kind] = KVSender(config, [KVBuffer.from_array(v) for v in views], compat)

    def address(self, layout: str) -> str:
        return self.senders[layout].bootstrap_address

    def open(self, layout: str, room: int, count: int, contiguous: bool = False) -> str:
        self.pool.alloc(room, count, contiguous)
        self.layout_of[room] = layout
        self.senders[layout].open_room(room)
        return digest(self.views[layout], self.pool.owned[room])

    def send(self, room: int, metadata: Any) -> None:
        self.senders[self.layout_of[room]].send(room, self.pool.owned[room], metadata)

    def wait(self, rooms: list[int], timeout: float = 20.0) -> dict[int, RoomStatus]:
        return super().wait(self.senders, rooms, timeout)

    def problems(self) -> list[str]:
        self.collect(self.senders)
        out = [
            f"{k}: {s.open_rooms()} rooms open" for k, s in self.senders.items() if s.open_rooms()
        ]
        return out + self.pool.problems()

    def close(self) -> None:
        for s in self.senders.values():
            s.close()


def decode_main(conn: Any, config: TransferConfig, num_pages: int, layouts: tuple) -> None:
    """Child process: decode receivers (one per layout) driven by commands from the pipe."""
    side = Side(num_pages, seed=os.getpid())
    receivers: dict[str, KVReceiver] = {}
    for kind in layouts:
        views, compat = make_layout(kind, num_pages, seed=None)
        side.views[kind] = views
        receivers[kind] = KVReceiver(config, [KVBuffer.from_array(v) for v in views], compat)
    conn.send(("ok", os.getpid()))
    while True:
        cmd, args = conn.recv()
        try:
            result = _decode_command(side, receivers, cmd, *args)
            conn.send(("ok", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))
        if cmd == "close":
            return


def _decode_command(side: Side, receivers: dict, cmd: str, *args: Any) -> Any:
    if cmd == "open":
        layout, room, address, count, contiguous = args
        pages = side.pool.alloc(room, count, contiguous)
        side.layout_of[room] = layout
        receivers[layout].open_room(room, address, pages)
        return pages
    if cmd == "abort":
        room, reason = args
        return receivers[side.layout_of[room]].abort(room, reason)
    if cmd == "status":
        return receivers[side.layout_of[args[0]]].status(args[0])
    if cmd == "wait":
        rooms, timeout = args
        done = side.wait(receivers, rooms, timeout)
        return {r: (s, side.digests[r]) for r, s in done.items()}
    if cmd == "problems":
        side.collect(receivers)
        open_rooms = [f"{k}: {r.open_rooms()} rooms open" for k, r in receivers.items()]
        return [p for p in open_rooms if not p.endswith(": 0 rooms open")] + side.pool.problems()
    if cmd == "close":
        for r in receivers.values():
            r.close()
        return None
    raise ValueError(cmd)


class DecodeNode:
    """Handle on a decode child process."""

    def __init__(
        self, config: TransferConfig, num_pages: int, layouts: tuple = ("mha", "mla", "page_major")
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=decode_main, args=(child, config, num_pages, layouts), daemon=True
        )
        self.proc.start()
        child.close()
        self._reply(timeout=60)

    def _reply(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError("decode child did not answer")
        kind, value = self._conn.recv()
        if kind == "error":
            raise RuntimeError(f"decode child failed:\n{value}")
        return value

    def call(self, cmd: str, *args: Any, timeout: float = 60.0) -> Any:
        self._conn.send((cmd, args))
        return self._reply(timeout)

    def open(self, layout: str, room: int, address: str, count: int, contiguous=False) -> list:
        return self.call("open", layout, room, address, count, contiguous)

    def wait(self, rooms: list[int], timeout: float = 20.0) -> dict[int, tuple[RoomStatus, str]]:
        return self.call("wait", rooms, timeout, timeout=timeout + 30)

    def stop(self) -> None:
        """SIGSTOP: the process stays, its sockets stay open, nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            self.call("close")
            self.proc.join(10)


def fast_config(backend: str, **overrides: Any) -> TransferConfig:
    """Tiny timeouts so failure tests finish in seconds."""
    base = TransferConfig(
        backend=backend,
        bootstrap_timeout_s=2.0,
        waiting_timeout_s=3.0,
        transfer_timeout_s=15.0,
        abort_timeout_s=2.0,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=3.0,
    )
    return replace(base, **overrides)
