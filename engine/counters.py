"""What an engine has computed since it started, as running totals: a node's stats line
(node/stats_log.py) turns their growth over an interval into rates. Counted once per step,
from the step's batch, before it runs."""

from __future__ import annotations

from dataclasses import dataclass

from engine.scheduler import ScheduledBatch


@dataclass
class StepCounters:
    # prompt positions computed here (not those read from the prefix cache or moved in by a
    # transfer); a resumed stream's replayed output counts, as it is computed like prompt
    prompt_tokens: int = 0
    generated_tokens: int = 0  # tokens sampled here
    prefix_queried: int = 0  # prompt tokens of requests that began computing their prompt
    prefix_hit: int = 0  # of those, the tokens the prefix cache held

    def count(self, batch: ScheduledBatch) -> None:
        """Take in a step's batch while each request's `num_computed` is still where the step
        starts."""
        for req, n in zip(batch.reqs, batch.num_tokens):
            start, prompt = req.num_computed, len(req.prompt_ids)
            self.prompt_tokens += max(0, min(start + n, prompt) - start)
            # NOTE: its first chunk starts right after what the cache held (a request retracted
            # before its first token is admitted, and counted, again)
            if not req.output_ids and start == req.num_cached_prompt:
                self.prefix_queried += prompt
                self.prefix_hit += start
        self.generated_tokens += sum(batch.samples)
