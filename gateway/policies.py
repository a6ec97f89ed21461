"""Routing policies: which instance of a role takes a request. One interface, a name registry.

    random         uniform
    round_robin    each in turn
    least_load     fewest requests (then tokens) this gateway has in flight there; ties at random
    power_of_two   the less loaded of two drawn at random
    cache_aware    the instance whose seen prompts share the longest prefix with this one (a
                   prefix tree per instance), unless loads are out of balance: then least load

Policies see only `Worker` state and the request's `RouteKey`; the gateway owns both.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from api.settings import GatewaySettings

from .prefix_tree import PrefixTree
from .workers import Worker


@dataclass(frozen=True)
class RouteKey:
    """What a policy may know of a request."""

    text: str = ""  # the prompt as text (token ids written out), for cache_aware
    tokens: int = 0  # estimated tokens it puts on an instance (prompt + output)


class Policy(ABC):
    """Picks the instance of one role that takes a request."""

    @abstractmethod
    def pick(self, workers: Sequence[Worker], key: RouteKey) -> Worker:
        """One of `workers` (never empty; all of them may take a request now)."""

    def forget(self, url: str) -> None:  # noqa: B027 (most policies keep nothing per instance)
        """`url` left the pool: drop what the policy keeps about it."""


def load_of(worker: Worker) -> tuple[int, int]:
    return worker.outstanding, worker.outstanding_tokens


class RandomPolicy(Policy):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, workers: Sequence[Worker], key: RouteKey) -> Worker:
        return self.rng.choice(workers)


class RoundRobinPolicy(Policy):
    def __init__(self) -> None:
        self._next = 0

    def pick(self, workers: Sequence[Worker], key: RouteKey) -> Worker:
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker


class LeastLoadPolicy(Policy):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, workers: Sequence[Worker], key: RouteKey) -> Worker:
        return least_loaded(workers, self.rng)


def least_loaded(workers: Sequence[Worker], rng: random.Random) -> Worker:
    lightest = min(load_of(w) for w in workers)
    return rng.choice([w for w in workers if load_of(w) == lightest])


class PowerOfTwoPolicy(Policy):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, workers: Sequence[Worker], key: RouteKey) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = self.rng.sample(list(workers), 2)
        return b if load_of(b) < load_of(a) else a


class CacheAwarePolicy(Policy):
    def __init__(self, settings: GatewaySettings, rng: random.Random) -> None:
        self.threshold = settings.cache_threshold
        self.balance_abs = settings.balance_abs_threshold
        self.balance_rel = settings.balance_rel_threshold
        self.max_chars = settings.cache_max_chars
        self.rng = rng
        self.trees: dict[str, PrefixTree] = {}

    def pick(self, workers: Sequence[Worker], key: RouteKey) -> Worker:
        worker = self._choose(workers, key.text)
        self._tree(worker.url).insert(key.text)
        return worker

    def _choose(self, workers: Sequence[Worker], text: str) -> Worker:
        if self.imbalanced(workers) or not text:
            return least_loaded(workers, self.rng)
        matched = {w.url: self._tree(w.url).match(text) for w in workers}
        best = max(workers, key=lambda w: (matched[w.url], -w.outstanding))
        if matched[best.url] / len(text) > self.threshold:
            return best
        # NOTE: no instance holds enough of it: spread by load (ties to the emptiest tree).
        lightest = min(load_of(w) for w in workers)
        idle = [w for w in workers if load_of(w) == lightest]
        return min(idle, key=lambda w: self._tree(w.url).size)

    def imbalanced(self, workers: Sequence[Worker]) -> bool:
        loads = [w.outstanding for w in workers]
        high, low = max(loads), min(loads)
        return high - low > self.balance_abs and high > low * self.balance_rel

    def forget(self, url: str) -> None:
        self.trees.pop(url, None)

    def _tree(self, url: str) -> PrefixTree:
        tree = self.trees.get(url)
        if tree is None:
            tree = self.trees[url] = PrefixTree(self.max_chars)
        return tree


PolicyFactory = Callable[[GatewaySettings, random.Random], Policy]

POLICIES: dict[str, PolicyFactory] = {
    "random": lambda settings, rng: RandomPolicy(rng),
    "round_robin": lambda settings, rng: RoundRobinPolicy(),
    "least_load": lambda settings, rng: LeastLoadPolicy(rng),
    "power_of_two": lambda settings, rng: PowerOfTwoPolicy(rng),
    "cache_aware": CacheAwarePolicy,
}


def make_policy(name: str, settings: GatewaySettings, rng: random.Random | None = None) -> Policy:
    """The policy called `name`; ValueError listing the names otherwise."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r} (choose one of {', '.join(POLICIES)})")
    return factory(settings, rng or random.Random())
