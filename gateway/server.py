"""`run(settings)`: serve the gateway with uvicorn on uvloop until a signal drains it.

On SIGTERM or SIGINT the gateway stops accepting connections, lets the responses it is sending
finish for up to `drain_timeout_s` (uvicorn's graceful shutdown), and returns: the process exits 0.
A second signal stops it without waiting.
"""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn

from api.settings import GatewaySettings

from .app import create_app

LOG_FORMAT = "%(asctime)s gateway %(levelname)s %(name)s: %(message)s"


class GatewayServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: not uvicorn's own: it raises the signal again once stopped, so the process would
        # die by it (exit -15) instead of exiting 0 after a graceful stop
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def run(settings: GatewaySettings) -> None:
    """Blocking; returns after SIGINT/SIGTERM once in-flight responses are closed."""
    # NOTE: force: `pdserve` configured its own logging first, without the level in the lines
    logging.basicConfig(force=True, level=settings.log_level.upper(), format=LOG_FORMAT)
    for chatty in ("httpx", "httpcore"):  # a line per upstream call at info, more at debug
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("pdserve.gateway").setLevel(settings.log_level.upper())
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        log_level=settings.log_level.lower(),
        access_log=False,
        # NOTE: nothing here reads the client's address, so X-Forwarded-* parsing is skipped
        proxy_headers=False,
        timeout_keep_alive=30,
        backlog=4096,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    GatewayServer(config).run()
