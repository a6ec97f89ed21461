"""How `pdserve launch` supervises a cluster: restarts, their budget, and the stop's grace.

The `launch:` section of a cluster config; `--timeout` and `--grace` override two of its keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.settings import setting


@dataclass(frozen=True)
class LaunchSettings:
    """Restart backoff and budget, the stop's grace period, the start's health wait."""

    restart_backoff_s: float = setting(
        1.0,
        "a component that crashes is restarted after this long, doubling on each restart (one "
        "that served and exited 0, a drained node, is restarted at once)",
    )
    restart_backoff_max_s: float = setting(30.0, "... up to this long")
    restart_budget: int = setting(
        5,
        "restarts of one component within restart_window_s after crashes (a drained node's exit "
        "0 spends none); one more crash and it stays down (0: never restart, not even a drained "
        "node)",
    )
    restart_window_s: float = setting(300.0, "the window the restart budget counts over")
    revive_after_s: float = setting(
        600.0,
        "a component given up on is started again this long after, with a fresh restart budget "
        "(0: never by itself; SIGHUP to `pdserve launch`, or `pdserve revive`, does it at once)",
    )
    grace_s: float = setting(
        45.0,
        "at stop, seconds from SIGTERM to SIGKILL, waited for the gateway and then for the "
        "nodes (above a node's drain time; `--grace` overrides)",
    )
    health_timeout_s: float = setting(
        600.0,
        "seconds for every component to answer GET /health at start (`--timeout`); later, a "
        "restarted one that is not healthy this long counts as one more exit",
    )

    def __post_init__(self) -> None:
        for name in ("restart_backoff_s", "restart_window_s", "health_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError(
                f"restart_backoff_max_s must be >= restart_backoff_s "
                f"({self.restart_backoff_max_s} < {self.restart_backoff_s})"
            )
        if self.restart_budget < 0:
            raise ValueError(f"restart_budget must be >= 0 (0: never), got {self.restart_budget}")
        for name in ("grace_s", "revive_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def backoff_s(self, restart: int) -> float:
        """The wait before restart number `restart` (1 for the first) of the current window."""
        doublings = min(max(restart - 1, 0), 64)  # NOTE: bounded: a huge budget stays a float
        return min(self.restart_backoff_s * 2**doublings, self.restart_backoff_max_s)
