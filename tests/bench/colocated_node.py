"""A colocated pdserve node for the benchmark tests: a decode node that prefills itself, with no
transfer engine (the fastest real node to start).

    python tests/bench/colocated_node.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys

from decode.loop import DecodeLoop
from engine.options import EngineOptions
from node.server import serve_node
from node.settings import NodeSettings
from transfer import TransferConfig

if __name__ == "__main__":
    settings = NodeSettings(
        role="decode",
        model=sys.argv[1],
        port=int(sys.argv[2]),
        served_model_name="tiny",
        transfer=TransferConfig(backend="none"),
        engine=EngineOptions(max_total_tokens=8192),
    )
    serve_node(settings, DecodeLoop)
