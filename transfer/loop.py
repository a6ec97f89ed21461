"""A small control loop: one thread owns the ZMQ sockets, runs posted calls and fires timers.

Other threads never touch a socket; they ``post`` a callable (or ``call`` and wait for its
result) and a pipe wakes the poller at once, so a posted message leaves without waiting for a
tick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import zmq

log = logging.getLogger(__name__)
T = TypeVar("T")
STALL_S = 0.5  # a posted call or timer that runs longer is logged: nothing else runs meanwhile


class ControlLoop:
    """Runs socket handlers, posted callables and periodic timers on one daemon thread."""

    def __init__(self, name: str, tick_s: float = 0.02) -> None:
        self.context = zmq.Context()
        self._name = name
        self._tick_s = tick_s
        self._poller = zmq.Poller()
        self._handlers: dict[zmq.Socket, Callable[[zmq.Socket], None]] = {}
        self._timers: list[list[Any]] = []  # [interval, next_due, fn]
        self._posted: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add_socket(self, sock: zmq.Socket, handler: Callable[[zmq.Socket], None]) -> None:
        """Call ``handler(sock)`` when it is readable (loop thread only, or before start)."""
        self._handlers[sock] = handler
        self._poller.register(sock, zmq.POLLIN)

    def remove_socket(self, sock: zmq.Socket) -> None:
        self._handlers.pop(sock, None)
        self._poller.unregister(sock)
        sock.close(linger=0)

    def every(self, interval_s: float, fn: Callable[[], None]) -> None:
        self._timers.append([interval_s, time.monotonic() + interval_s, fn])

    def start(self) -> None:
        self._thread.start()

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread soon (thread-safe, never blocks)."""
        self._posted.put(fn)
        with contextlib.suppress(BlockingIOError):  # a full pipe means the loop is awake
            os.write(self._wake_w, b"x")

    def call(self, fn: Callable[[], T], timeout_s: float = 30.0) -> T:
        """Run ``fn`` on the loop thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn()
        if not self._thread.is_alive():
            raise RuntimeError(f"{self._name} is closed")
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:  # handed back to the caller
                future.set_exception(e)

        self.post(run)
        return future.result(timeout_s)

    def stop(self) -> None:
        """Stop the thread, close every socket and the context."""
        self._stopping.set()
        self.post(lambda: None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        for sock in list(self._handlers):
            sock.close(linger=0)
        self._handlers.clear()
        self.context.term()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step()
            except Exception:
                log.exception("%s: control loop step failed; continuing", self._name)

    def _step(self) -> None:
        now = time.monotonic()
        next_due = min((t[1] for t in self._timers), default=now + self._tick_s)
        timeout_ms = max(0.0, min(self._tick_s, next_due - now)) * 1000
        for sock, _ in self._poller.poll(timeout_ms):
            if sock == self._wake_r:
                self._drain_wake_pipe()
            elif sock in self._handlers:
                self._handlers[sock](sock)
        self._run_posted()
        self._run_timers()

    def _drain_wake_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _run_posted(self) -> None:
        while True:
            try:
                fn = self._posted.get_nowait()
            except queue.Empty:
                return
            try:
                self._timed(fn)
            except Exception:
                log.exception("%s: posted call failed", self._name)

    def _run_timers(self) -> None:
        now = time.monotonic()
        for timer in self._timers:
            if timer[1] <= now:
                timer[1] = now + timer[0]
                self._timed(timer[2])

    def _timed(self, fn: Callable[[], None]) -> None:
        start = time.monotonic()
        fn()
        took = time.monotonic() - start
        if took > STALL_S:
            log.warning("%s: %s held the control loop for %.1fs", self._name, _name_of(fn), took)


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
