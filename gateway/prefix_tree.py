"""An approximate record of the prompts an instance has seen: a character-level radix tree.

It stands in for the instance's KV prefix cache, which the gateway cannot see: the longer the
prefix a new prompt shares with what went to an instance, the more of it is likely cached there.
Its size (characters on edges) is bounded; past `max_chars` the least recently used leaves go.

    root --"Hello, "--> n1 --"world"--> n2
                           \\--"there"--> n3      insert("Hello, there") split nothing,
                                                 match("Hello, thx") == 9
"""

from __future__ import annotations

import heapq
import itertools


class _Node:
    __slots__ = ("children", "label", "last_used", "parent")

    def __init__(self, label: str, parent: _Node | None, last_used: int) -> None:
        self.label = label
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.last_used = last_used


def _common_prefix(a: str, b: str, start: int) -> int:
    """Length of the common prefix of `a` and `b[start:]`."""
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


class PrefixTree:
    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.size = 0
        self._clock = itertools.count(1)
        self._root = _Node("", None, 0)

    def match(self, text: str) -> int:
        """How many leading characters of `text` this tree holds."""
        node, pos = self._root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                return pos
            common = _common_prefix(child.label, text, pos)
            pos += common
            if common < len(child.label):
                return pos
            node = child
        return pos

    def insert(self, text: str) -> None:
        """Record `text` (and mark its path as just used); evicts when over `max_chars`."""
        now = next(self._clock)
        node, pos = self._root, 0
        while pos < len(text):
            node.last_used = now
            child = node.children.get(text[pos])
            if child is None:
                node.children[text[pos]] = _Node(text[pos:], node, now)
                self.size += len(text) - pos
                break
            common = _common_prefix(child.label, text, pos)
            if common < len(child.label):
                child = self._split(child, common)
            pos += common
            node = child
        node.last_used = now
        if self.size > self.max_chars:
            # NOTE: down to 90%, so that eviction (a walk of the whole tree) stays rare.
            self.evict(self.max_chars * 9 // 10)

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut `child`'s edge after `at` characters; returns the new middle node."""
        parent = child.parent
        assert parent is not None
        middle = _Node(child.label[:at], parent, child.last_used)
        parent.children[middle.label[0]] = middle
        child.label = child.label[at:]
        child.parent = middle
        middle.children[child.label[0]] = child
        return middle

    def evict(self, max_chars: int) -> None:
        """Drop least recently used leaves until the tree holds at most `max_chars`."""
        leaves = [(n.last_used, id(n), n) for n in self._nodes() if not n.children]
        heapq.heapify(leaves)
        while self.size > max_chars and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            if parent is None:
                break
            del parent.children[leaf.label[0]]
            self.size -= len(leaf.label)
            if not parent.children and parent is not self._root:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))

    def _nodes(self) -> list[_Node]:
        out, stack = [], [self._root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out[1:]

    def check_integrity(self) -> None:
        """Raise AssertionError when `size` or the parent/child links are wrong (for tests)."""
        total = 0
        for node in self._nodes():
            assert node.label, "an edge without characters"
            assert node.parent is not None and node.parent.children[node.label[0]] is node
            total += len(node.label)
        assert total == self.size, f"size {self.size} but the edges hold {total} characters"
