"""Requests whose grammar compiles off the scheduler loop.

Compiling a JSON schema or an EBNF grammar takes from milliseconds to a good part of a second
(a 10 KB schema: ~55 ms here), and on the loop that would stall every running stream for as
long. A request with a grammar the engine has not compiled yet waits here while one worker
thread compiles it (xgrammar releases the GIL); the loop keeps stepping, and starts the request
once its grammar is ready, or answers 400 naming what is wrong with it. A cached grammar (the
common case: clients reuse their schemas) starts at once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from engine.grammar import Grammars
from node.messages import GenerateRequest


@dataclass
class GrammarQueue:
    grammars: Grammars
    waiting: dict[str, tuple[GenerateRequest, Future[Any]]] = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None

    def must_wait(self, req: GenerateRequest) -> bool:
        """Whether `req` has a grammar that is not compiled yet (then `park` it)."""
        grammar = req.params.get("grammar")
        return bool(grammar) and not self.grammars.is_compiled(*grammar)

    def park(self, req: GenerateRequest) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        kind, source = req.params["grammar"]
        self.waiting[req.rid] = (req, self._pool.submit(self.grammars.compiled, kind, source))

    def ready(self) -> list[tuple[GenerateRequest, BaseException | None]]:
        """The parked requests whose grammar is done, in arrival order, each with the error
        that compiling it raised (None: compiled)."""
        done = [rid for rid, (_, future) in self.waiting.items() if future.done()]
        out = []
        for rid in done:
            req, future = self.waiting.pop(rid)
            out.append((req, future.exception()))
        return out

    def drop(self, rid: str) -> bool:
        """Forget a parked request (aborted); whether it was parked."""
        return self.waiting.pop(rid, None) is not None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
