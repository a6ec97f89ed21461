"""Fixtures: one prefill side (in this process) and one decode child per backend, shared by the
tests of a session; after every test both must have no open room and no page owned."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .harness import DecodeNode, PrefillSide, fast_config

BACKENDS = ("mooncake", "nixl", "nccl")
NUM_PAGES = 8192


class Cluster:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.config = fast_config(backend)
        self.prefill = PrefillSide(self.config, NUM_PAGES)
        self.decode = DecodeNode(self.config, NUM_PAGES, ("mha", "mla", "page_major", "mha_bad"))

    def problems(self) -> list[str]:
        return [f"prefill {p}" for p in self.prefill.problems()] + [
            f"decode {p}" for p in self.decode.call("problems")
        ]

    def close(self) -> None:
        self.decode.close()
        self.prefill.close()


@pytest.fixture(scope="session", params=BACKENDS)
def cluster_session(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    cluster = Cluster(request.param)
    yield cluster
    cluster.close()


@pytest.fixture
def cluster(cluster_session: Cluster) -> Iterator[Cluster]:
    """The shared cluster, checked after the test: no open room, no page owned twice or leaked."""
    yield cluster_session
    # NOTE: aborts travel asynchronously (a decode timeout reaches prefill a moment later), so
    # the check waits for the sides to settle, up to a bound, instead of sampling once.
    deadline = time.monotonic() + 10
    while (problems := cluster_session.problems()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert problems == []
