"""Gateway fixtures: a gateway in front of stand-in upstreams, all real servers on loopback."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from api.settings import GatewaySettings, Instance
from gateway.app import create_app
from gateway.context import Gateway

from .servers import ServerThread
from .standin import StandIn


@dataclass
class Harness:
    gw: Gateway
    server: ServerThread
    prefill: list[StandIn]
    decode: list[StandIn]
    upstreams: dict[str, ServerThread] = field(default_factory=dict)  # standin name -> server

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, trust_env=False, **kw)

    def url_of(self, standin: StandIn) -> str:
        return self.upstreams[standin.name].url

    def stop(self) -> None:
        self.server.stop()
        for upstream in self.upstreams.values():
            upstream.stop()


def start_standin(name: str) -> tuple[StandIn, ServerThread]:
    standin = StandIn(name)
    return standin, ServerThread(standin.app()).start()


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    """`harness(prefill=1, decode=1, **GatewaySettings fields) -> Harness`."""
    made: list[Harness] = []

    def make(prefill: int = 1, decode: int = 1, **settings: Any) -> Harness:
        upstreams: dict[str, ServerThread] = {}
        roles: dict[str, list[StandIn]] = {"prefill": [], "decode": []}
        for role, count in (("prefill", prefill), ("decode", decode)):
            for i in range(count):
                standin, server = start_standin(f"{role[0]}{i}")
                roles[role].append(standin)
                upstreams[standin.name] = server
        settings.setdefault("health_interval_s", 60.0)
        gateway_settings = GatewaySettings(
            prefill=tuple(
                Instance(upstreams[s.name].url, 8998 + i) for i, s in enumerate(roles["prefill"])
            ),
            decode=tuple(Instance(upstreams[s.name].url) for s in roles["decode"]),
            **settings,
        )
        gw = Gateway(gateway_settings, rng=random.Random(0))
        server = ServerThread(create_app(gateway_settings, gw)).start()
        h = Harness(gw, server, roles["prefill"], roles["decode"], upstreams)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()
