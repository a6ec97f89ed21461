"""Real HTTP servers for gateway tests: uvicorn in a thread, on a socket bound before it starts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

START_TIMEOUT_S = 20.0


def bound_socket(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def wait_until(condition: Callable[[], Any], timeout_s: float = 10.0, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy (its value), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}")
        time.sleep(0.01)


class ServerThread:
    """Serves `app` on `host` (`port`, or a free one) until `stop()`."""

    def __init__(self, app: Any, port: int = 0, host: str = "127.0.0.1") -> None:
        self.sock = bound_socket(port, host)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],), daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), START_TIMEOUT_S)
        if not self.server.started:
            raise RuntimeError(f"server on port {self.port} did not start (see the log above)")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
