"""A colocated pdserve node for the benchmark tests: a decode node that prefills itself, with no
transfer engine (the fastest real node to start).

    python tests/bench/node.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys

import decode.server
from api.settings import NodeSettings, TransferSettings

if __name__ == "__main__":
    settings = NodeSettings(
        role="decode",
        model=sys.argv[1],
        port=int(sys.argv[2]),
        served_model_name="tiny",
        transfer=TransferSettings(backend="none"),
        engine={"max_total_tokens": 8192},
    )
    decode.server.run(settings)
