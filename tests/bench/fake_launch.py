"""Stands in for `pdserve launch` in --compare tests: announces an already running server as the
cluster (the launcher's ready line), then waits for SIGTERM, as the launcher does.

    python fake_launch.py URL [CONFIG ARGS...]
"""

from __future__ import annotations

import signal
import sys
import time

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"pdserve cluster ready: {sys.argv[1]}/v1", flush=True)
    while True:
        time.sleep(1)
