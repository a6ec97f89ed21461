"""The prefill node: HTTP API in this process, the prefill scheduler in a child process."""

from __future__ import annotations

from api.node_server import serve_node
from api.settings import NodeSettings


def run(settings: NodeSettings) -> None:
    """Serve a prefill node until SIGINT/SIGTERM."""
    from engine.tokenizer import load_tokenizer
    from prefill.scheduler import scheduler_main

    if settings.role != "prefill":
        raise ValueError(f"settings for a {settings.role} node given to the prefill server")
    serve_node(settings, scheduler_main, load_tokenizer(settings.model))
