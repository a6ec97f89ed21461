"""Routing policies and the prefix tree behind cache_aware."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from api.settings import GatewaySettings, Instance
from gateway.breaker import CircuitBreaker
from gateway.policies import POLICIES, CacheAwarePolicy, RouteKey, make_policy
from gateway.prefix_tree import PrefixTree
from gateway.workers import Worker

SETTINGS = GatewaySettings()
NO_KEY = RouteKey()


def workers(n: int, role: str = "prefill") -> list[Worker]:
    return [
        Worker(role, Instance(f"http://10.0.0.{i}:8000", 8998), CircuitBreaker(5, 10.0))  # type: ignore[arg-type]
        for i in range(n)
    ]


def picks(name: str, ws: list[Worker], n: int, key: RouteKey = NO_KEY) -> Counter[str]:
    policy = make_policy(name, SETTINGS, random.Random(1))
    return Counter(policy.pick(ws, key).url for _ in range(n))


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("fastest", SETTINGS)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_spreads_idle_load_over_all_instances(name: str) -> None:
    ws = workers(4)
    counts = picks(name, ws, 400, RouteKey("", 1))  # cache_aware: no text, least load decides
    assert set(counts) == {w.url for w in ws}
    assert min(counts.values()) > 50, counts


def test_round_robin_takes_turns() -> None:
    ws = workers(3)
    policy = make_policy("round_robin", SETTINGS)
    assert [policy.pick(ws, RouteKey()).url for _ in range(6)] == [w.url for w in ws] * 2


def test_least_load_picks_fewest_requests_then_fewest_tokens() -> None:
    ws = workers(3)
    ws[0].outstanding, ws[1].outstanding, ws[2].outstanding = 3, 1, 1
    ws[1].outstanding_tokens, ws[2].outstanding_tokens = 500, 20
    assert picks("least_load", ws, 20) == Counter({ws[2].url: 20})


def test_power_of_two_never_picks_the_busiest_of_its_draw() -> None:
    ws = workers(3)
    ws[0].outstanding = 10  # the busiest: it only wins a draw against itself, which cannot happen
    counts = picks("power_of_two", ws, 300)
    assert ws[0].url not in counts and set(counts) == {ws[1].url, ws[2].url}


def test_cache_aware_follows_the_longest_prefix() -> None:
    ws = workers(3)
    policy = make_policy("cache_aware", SETTINGS, random.Random(0))
    doc_a, doc_b = "You are a helpful assistant. " * 10, "Translate to French: " * 10
    first_a = policy.pick(ws, RouteKey(doc_a + "question 1"))
    first_b = policy.pick(ws, RouteKey(doc_b + "question 1"))
    assert first_a is not first_b  # nothing matched: the emptiest tree takes the new prefix
    for i in range(10):
        assert policy.pick(ws, RouteKey(f"{doc_a}question {i}")) is first_a
        assert policy.pick(ws, RouteKey(f"{doc_b}question {i}")) is first_b


def test_cache_aware_falls_back_to_least_load_when_imbalanced() -> None:
    ws = workers(2)
    settings = replace(SETTINGS, balance_abs_threshold=4, balance_rel_threshold=1.5)
    policy = CacheAwarePolicy(settings, random.Random(0))
    text = "shared system prompt " * 20
    home = policy.pick(ws, RouteKey(text))
    other = ws[1] if home is ws[0] else ws[0]
    home.outstanding = 4  # diff 4: not above the absolute threshold yet
    assert policy.pick(ws, RouteKey(text + "again")) is home
    home.outstanding = 5  # diff 5 > 4 and 5 > 0 * 1.5: out of balance
    assert policy.imbalanced(ws)
    assert policy.pick(ws, RouteKey(text + "again")) is other


def test_cache_aware_relative_threshold_keeps_affinity_under_even_load() -> None:
    ws = workers(2)
    settings = replace(SETTINGS, balance_abs_threshold=4, balance_rel_threshold=1.5)
    policy = CacheAwarePolicy(settings, random.Random(0))
    text = "another long shared prefix " * 20
    home = policy.pick(ws, RouteKey(text))
    other = ws[1] if home is ws[0] else ws[0]
    home.outstanding, other.outstanding = 30, 24  # diff 6 > 4 but 30 < 24 * 1.5
    assert not policy.imbalanced(ws)
    assert policy.pick(ws, RouteKey(text + "!")) is home


def test_cache_aware_low_match_goes_to_least_load() -> None:
    ws = workers(2)
    policy = CacheAwarePolicy(SETTINGS, random.Random(0))
    home = policy.pick(ws, RouteKey("abcdefghij" * 5))
    home.outstanding = 1
    fresh = policy.pick(ws, RouteKey("zyxwvutsrq" * 5))  # shares nothing: least load wins
    assert fresh is not home


def test_cache_aware_forgets_a_removed_instance() -> None:
    ws = workers(2)
    policy = CacheAwarePolicy(SETTINGS, random.Random(0))
    home = policy.pick(ws, RouteKey("prefix " * 30))
    policy.forget(home.url)
    assert home.url not in policy.trees


def test_prefix_tree_matches_inserted_prefixes() -> None:
    tree = PrefixTree(max_chars=1000)
    tree.insert("Hello, world")
    tree.insert("Hello, there")
    tree.insert("Help")
    assert tree.match("Hello, thx") == 9
    assert tree.match("Hello, world and more") == 12
    assert tree.match("Hex") == 2
    assert tree.match("nothing") == 0
    assert tree.match("") == 0
    assert tree.size == len("Hello, world") + len("there") + len("p")
    tree.check_integrity()


def test_prefix_tree_evicts_least_recently_used_text() -> None:
    tree = PrefixTree(max_chars=100)
    tree.insert("a" * 40)
    tree.insert("b" * 40)
    tree.insert("a" * 40)  # touch: "b..." is now the oldest
    tree.insert("c" * 40)  # 120 > 100: evict down to 90
    assert tree.size <= 100
    assert tree.match("a" * 40) == 40 and tree.match("c" * 40) == 40
    assert tree.match("b" * 40) == 0
    tree.check_integrity()


def test_prefix_tree_stays_bounded_under_random_text() -> None:
    rng = random.Random(0)
    tree = PrefixTree(max_chars=2000)
    for _ in range(500):
        stem = rng.choice(["system: be brief. ", "system: be kind. ", ""])
        tree.insert(stem + "".join(rng.choice("abcd") for _ in range(rng.randint(1, 60))))
        assert tree.size <= 2000
    tree.check_integrity()
