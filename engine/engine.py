"""The engine: requests in, tokens and text out, one `step()` at a time.

It glues the scheduler (what runs), the runner (the model), the sampler, and per-request
detokenization and stop rules. It knows nothing of HTTP or other nodes; servers drive it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerFast

from engine.config import ModelConfig
from engine.counters import StepCounters
from engine.dp_scheduler import DPScheduler, rank_pools
from engine.environment import check_device, limit_onednn_caches
from engine.grammar import Grammars
from engine.kv.radix import RadixCache
from engine.options import EngineOptions
from engine.parallel.check import check_parallel
from engine.parallel.worker import RankSetup, start_group, threads_per_rank
from engine.prompt_logprobs import PromptLogprobs
from engine.request import Req
from engine.runner import ModelRunner, StepResult
from engine.sampling import SamplerState, SamplingParams
from engine.scheduler import Scheduler
from engine.stop import StopChecker, replay_text
from engine.tokenizer import IncrementalDetokenizer, eos_token_ids, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    rid: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # with the first output of a request that asked: prompt position i's at entry i - 1
    prompt_logprobs: PromptLogprobs | None = None
    logits: torch.Tensor | None = None  # only when the engine keeps logits (tests)


class Engine:
    def __init__(
        self,
        model_path: str,
        options: EngineOptions | None = None,
        *,
        keep_logits: bool = False,
        rank_setup: RankSetup | None = None,
        tokenizer: PreTrainedTokenizerFast | None = None,
    ) -> None:
        """`rank_setup`: called in each other rank once its model is loaded (see
        engine/parallel/worker.py); a node starts the ranks' transfer engines with it.
        `tokenizer`: the checkpoint's, already loaded (a node's HTTP process hands over its own,
        which unpickles several times faster than transformers loads it)."""
        self.model_path = str(model_path)
        self.options = options = options or EngineOptions()
        limit_onednn_caches(options.onednn_cache)
        self.model_cfg = ModelConfig.load(model_path)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        self.eos_token_ids = frozenset(eos_token_ids(model_path, self.tokenizer))
        check_device(options.device)
        torch.manual_seed(options.seed)
        self.group = None
        if options.tp_size > 1:
            check_parallel(self.model_cfg, options)
            torch.set_num_threads(threads_per_rank(options))
            self.group = start_group(self.model_path, options, rank_setup)  # ranks 1.. load too
        elif options.threads is not None:
            torch.set_num_threads(options.threads)
        try:
            self.runner = ModelRunner(
                self.model_path,
                options,
                self.model_cfg,
                self.eos_token_ids,
                keep_logits=keep_logits,
                group=self.group,
            )
        except BaseException:
            self.close()
            raise
        if self.group is not None:
            self.group.watch()
        self.pool = self.runner.pool  # rank 0's (under DP attention each rank has its own)
        self.scheduler: Scheduler | DPScheduler
        if options.dp_attention:
            pools = rank_pools(self.pool, options.tp_size)
            self.scheduler = DPScheduler(options.scheduler, pools, options.enable_prefix_cache)
        else:
            cache = RadixCache(self.pool) if options.enable_prefix_cache else None
            self.scheduler = Scheduler(options.scheduler, self.pool, cache)
        self.max_model_len = options.max_model_len or self.model_cfg.max_position_embeddings
        self.grammars = Grammars(self.tokenizer, self.model_cfg.vocab_size, self.eos_token_ids)
        self.keep_logits = keep_logits
        self.counters = StepCounters()  # tokens computed and sampled so far (stats lines)

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        rid: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
        resumed: int = 0,
    ) -> Req:
        """Queue a request; raises ValueError with the fix when it cannot run.

        `prefill_only` (a prefill node): the request ends after its first token, and its pages
        stay held (`kv_pages`) until `release` once they have been sent.
        `resumed`: the last this many of `prompt_ids` are output the request already produced
        elsewhere (a stream moved off a failed node): they are computed like prompt, and count as
        output for max_tokens, penalties, the seeded draw's position, stop text and usage.
        `params.prompt_logprobs` come with the first output, but for a resumed request (its
        first node reported them) and a prefill-only one (the node answering its client does).
        """
        req = self._new_req(rid, prompt_ids, params, resumed)
        req.prefill_only = prefill_only
        if params.prompt_logprobs is not None and not (resumed or prefill_only):
            total = len(req.prompt_ids) - 1
            first = min(params.prompt_logprobs_start, total)
            req.prompt_logprobs = PromptLogprobs(total, first)
        self.scheduler.add(req)
        return req

    def check_request(
        self, prompt_ids: Sequence[int], params: SamplingParams, resumed: int = 0
    ) -> None:
        """Raise ValueError (naming the fix) if this request could never run here."""
        self._validate([int(t) for t in prompt_ids], params, resumed)

    def cached_prefix_len(self, prompt_ids: Sequence[int]) -> int:
        """How many leading prompt tokens the prefix cache holds now."""
        return self.scheduler.cached_prefix_len(list(prompt_ids)[:-1])

    def _new_req(
        self, rid: str, prompt_ids: Sequence[int], params: SamplingParams, resumed: int = 0
    ) -> Req:
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params, resumed)
        if self.scheduler.find(rid) is not None:
            raise ValueError(f"request id {rid!r} is already in use (send a unique rid)")
        req = Req(rid, prompt, params, num_resumed=resumed)
        req.sampler_state = SamplerState.create(params, prompt[: len(prompt) - resumed])
        if params.grammar is not None:  # a bad grammar raises ValueError naming the problem
            req.sampler_state.matcher = self.grammars.matcher(*params.grammar)
        req.detokenizer = IncrementalDetokenizer(
            self.tokenizer, skip_special_tokens=params.skip_special_tokens
        )
        req.stop_checker = StopChecker(params, self.eos_token_ids)
        if resumed:
            self._replay_output(req, prompt[len(prompt) - resumed :])
        return req

    def _replay_output(self, req: Req, output: list[int]) -> None:
        """A resumed request's state as the node that produced `output` left it: sampler counts,
        the detokenizer (fed token by token, as there), the text kept and the text shown."""
        for token in output:
            req.sampler_state.append(token)
        req.text, shown = replay_text(req.detokenizer, output, req.params.stop)
        req.num_sent_chars = len(shown)

    # ---- PD --------------------------------------------------------------------------------

    def reserve(
        self,
        rid: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        headroom: int = 0,
        resumed: int = 0,
    ) -> list[int] | None:
        """Decode side: hold pages for the prompt (+ headroom tokens) before its KV arrives.

        Returns the page ids that will hold the prompt's KV, or None when memory is short (try
        again later; nothing is held). Raises ValueError for a request that can never run.
        """
        if params.prompt_logprobs is not None and not resumed:
            raise ValueError(
                "prompt_logprobs need the prompt computed on the node that answers (send the "
                "request without bootstrap fields)"
            )
        req = self._new_req(rid, prompt_ids, params, resumed)
        tokens = min(len(req.prompt_ids) + max(headroom, 1), self.max_model_len)
        if not self.scheduler.reserve(req, tokens):
            return None
        return self.kv_pages(rid)

    def activate(
        self,
        rid: str,
        first_token: int,
        logprob: float | None = None,
        top_logprobs: Sequence[tuple[int, float]] = (),
        cached_tokens: int = 0,
    ) -> RequestOutput:
        """Decode side: the prompt's KV and first token arrived; the request starts decoding."""
        req = self._held(rid)
        self.scheduler.activate(req)
        req.num_cached_prompt = cached_tokens
        req.output_ids.append(first_token)
        req.sampler_state.append(first_token)
        out = RequestOutput(rid, [first_token], "", False)
        if req.params.logprobs is not None and logprob is not None:
            out.logprobs, out.top_logprobs = [logprob], [list(top_logprobs)]
        self._finish_output(req, first_token, out)
        return out

    def kv_pages(self, rid: str) -> list[int]:
        """The pages holding a held request's prompt KV, in sequence order."""
        req = self._held(rid)
        return req.page_table[: -(-len(req.prompt_ids) // self.pool.page_size)]

    def release(self, rid: str, *, cache: bool = True) -> None:
        """End a held request (sent, failed or aborted): its pages go back exactly once.

        NOTE: call it only once no transfer can still touch the pages (the room is final)."""
        self.scheduler.finish(self._held(rid), "released", cache=cache)

    def _held(self, rid: str) -> Req:
        req = self.scheduler.held.get(rid)
        if req is None:
            raise KeyError(f"no reserved or parked request {rid!r}")
        return req

    def _validate(self, prompt: list[int], params: SamplingParams, resumed: int = 0) -> None:
        if not prompt:
            raise ValueError("prompt is empty (send at least one token or a non-empty text)")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens but the model's context is "
                f"{self.max_model_len} (shorten the prompt to leave room for output)"
            )
        vocab = self.model_cfg.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        params.validate(self.max_model_len, self.model_cfg.vocab_size)
        if not 0 <= resumed < len(prompt) or resumed >= params.max_tokens:
            raise ValueError(
                f"cannot resume {resumed} output tokens after a {len(prompt) - resumed}-token "
                f"prompt with max_tokens={params.max_tokens} (nothing would be left to generate)"
            )
        if params.grammar is not None:  # compiled now (and cached): a bad one is refused here
            self.grammars.compiled(*params.grammar)
        pages = -(-(len(prompt) + 1) // self.pool.page_size)
        if pages > self.pool.total_pages:
            raise ValueError(
                f"prompt needs {pages} KV pages but the pool holds {self.pool.total_pages} "
                "(raise max_total_tokens or mem_fraction)"
            )

    def abort(self, rid: str) -> bool:
        """Drop a request wherever it is; False if unknown. For a held request whose pages a
        transfer may still write, wait for the room to end and call `release` instead."""
        req = self.scheduler.find(rid)
        if req is None:
            return False
        self.scheduler.finish(req, "abort", cache=False)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        self.counters.count(batch)
        result = self.runner.run(batch)
        self.scheduler.advance(batch)
        return [self._emit(i, req, result) for i, req in enumerate(result.sampled)]

    def _emit(self, i: int, req: Req, result: StepResult) -> RequestOutput:
        assert result.output is not None
        token = result.output.token_ids[i]
        req.output_ids.append(token)
        req.sampler_state.append(token)
        out = RequestOutput(req.rid, [token], "", False)
        if result.output.logprobs is not None:
            out.logprobs = [result.output.logprobs[i]]
            out.top_logprobs = [result.output.top_logprobs[i]] if result.output.top_logprobs else []
        if self.keep_logits and result.logits is not None:
            out.logits = result.logits[i].clone()
        prompt = req.prompt_logprobs
        if prompt is not None and not prompt.sent:
            assert not prompt.pending, f"{req.rid} sampled before its prompt logprobs were all in"
            out.prompt_logprobs, prompt.sent = prompt, True
        self._finish_output(req, token, out)
        return out

    def _finish_output(self, req: Req, token: int, out: RequestOutput) -> None:
        if req.prefill_only:
            self._end_prefill(req, token, out)
        else:
            self._apply_stop_rules(req, token, out)
        out.prompt_tokens = len(req.prompt_ids) - req.num_resumed
        out.completion_tokens = req.num_resumed + len(req.output_ids)
        out.cached_tokens = min(req.num_cached_prompt, out.prompt_tokens)

    def _end_prefill(self, req: Req, token: int, out: RequestOutput) -> None:
        """A prefill node's request is done after one token; its pages wait to be sent."""
        req.text = req.detokenizer.push(token) + req.detokenizer.finish()
        self.scheduler.park(req)
        out.text_delta = req.text
        out.finished, out.finish_reason = True, "length"

    def _apply_stop_rules(self, req: Req, token: int, out: RequestOutput) -> None:
        delta = req.detokenizer.push(token)
        produced = req.num_resumed + len(req.output_ids)
        verdict = req.stop_checker.check(token, produced, req.text + delta, len(delta))
        reason = verdict.finish_reason
        if reason is None and req.sampler_state.grammar_done:
            reason = "stop"  # the grammar is complete (its stop token, or a refused token)
        if reason is None and req.seq_len >= self.max_model_len:
            reason = "length"
        if reason is not None:
            # a cut at max length keeps any bytes the detokenizer still holds, as decode() would
            tail = req.detokenizer.finish() if reason == "length" else ""
            req.text = verdict.text + tail
            self.scheduler.finish(req, reason)
            req.matched_stop = verdict.matched_stop
            shown = req.text
        else:
            req.text = verdict.text
            shown = verdict.streamable_text
            if len(req.output_ids) == 1:
                self.scheduler.cache_prefix(req)
        out.text_delta = shown[req.num_sent_chars :]
        req.num_sent_chars = max(req.num_sent_chars, len(shown))
        out.finished = reason is not None
        out.finish_reason = reason
        out.matched_stop = req.matched_stop

    # ---- maintenance -------------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Drop the prefix cache; refused (False) while requests run."""
        if self.scheduler.has_work():
            return False
        self.scheduler.reset_cache()
        return True

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def check_health(self) -> None:
        """Raise RankFailure once a rank of this engine's group is gone (cheap: call it often)."""
        if self.group is not None:
            self.group.check()

    def close(self) -> None:
        """Stop the engine's other ranks (a no-op for one rank); the engine is unusable after."""
        if self.group is not None:
            self.group.close()
            self.group = None

    @property
    def num_free_pages(self) -> int:
        """Pages not held by any request (free or only in the prefix cache), on every rank."""
        return self.scheduler.free_pages

    @property
    def total_pages(self) -> int:
        """Usable KV pages, on every rank (DP attention: each rank's pool counts)."""
        return self.scheduler.total_pages

    def kv_owner(self, rid: str) -> int:
        """DP attention: the rank whose pool alone holds a held request's KV; otherwise -1
        (every rank holds its part)."""
        return self._held(rid).dp_rank if self.options.dp_attention else -1
