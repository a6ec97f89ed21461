"""Node addresses by name: the gateway connects to `host:port` as the config or `/workers` wrote it,
resolving the name on every new connection (a pod restarted under its name has a new address).

`Resolve` is the interface (tests swap what a name resolves to between two live servers); the
default asks the system (`getaddrinfo`: /etc/hosts, cluster DNS). No answer is cached here: what a
name resolves to is only pinned by the connections already open to it, and the transport drops
those of an instance whose connect failed (transport.NodeTransport).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

Resolve = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> addresses, in order to try


async def system_resolve(host: str, port: int) -> list[str]:
    """The addresses the system gives `host` for TCP (an IP literal gives itself)."""
    try:
        return [str(ipaddress.ip_address(host))]  # NOTE: no thread hop for the common case
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


async def open_connection(
    factory: Callable[[], asyncio.Protocol], host: str, port: int, resolve: Resolve
) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
    """A connection to the first of `host`'s addresses that accepts one; OSError naming the host
    (and the address tried last) when none does."""
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot resolve node host {host!r}: {exc}") from None
    if not addresses:
        raise OSError(f"node host {host!r} resolves to no address")
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for address in addresses:
        try:
            return await loop.create_connection(factory, address, port)
        except OSError as exc:
            last = exc
    assert last is not None
    raise OSError(last.errno, f"{host} ({addresses[-1]}:{port}): {last.strerror or last}")
