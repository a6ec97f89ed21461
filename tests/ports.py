"""Ports for servers a test starts: free, and outside the kernel's ephemeral range.

A port the kernel handed out (bind to 0) is back in the ephemeral pool once the test closes it,
so the nodes' own ephemeral binds (UCX listeners, ZMQ sockets, outgoing connections) can take it
before the server the test meant it for binds: a CI run saw a gateway fail with EADDRINUSE that
way. Ports drawn below the ephemeral range (and above Mooncake's handshake ports, 12001-17000)
are only ever taken by someone who asked for them by number.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct ports, each bindable on 127.0.0.1 now, drawn at random below the ephemeral
    range (random so a test does not reuse ports that the one before it left in TIME_WAIT)."""
    high = max(_ephemeral_low(), LOWEST + 1000)
    rng = random.Random()
    ports: list[int] = []
    for _ in range(100 * n):
        port = rng.randrange(LOWEST, high)
        if port not in ports and _bindable(port):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"no {n} free ports in {LOWEST}-{high}")


def free_port() -> int:
    return free_ports(1)[0]
