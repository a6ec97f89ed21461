"""`run(settings)`: serve the gateway with uvicorn on uvloop until interrupted."""

from __future__ import annotations

import logging

import uvicorn

from api.settings import GatewaySettings

from .app import create_app

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def run(settings: GatewaySettings) -> None:
    """Blocking; returns after SIGINT/SIGTERM once in-flight responses are closed."""
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
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
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
