"""The decode node: HTTP API in this process, the decode scheduler in a child process."""

from __future__ import annotations

from api.node_server import serve_node
from api.settings import NodeSettings


def run(settings: NodeSettings) -> None:
    """Serve a decode node until SIGINT/SIGTERM."""
    from decode.scheduler import scheduler_main
    from engine.tokenizer import load_tokenizer

    if settings.role != "decode":
        raise ValueError(f"settings for a {settings.role} node given to the decode server")
    serve_node(settings, scheduler_main, load_tokenizer(settings.model))
