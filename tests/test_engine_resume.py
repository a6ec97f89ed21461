"""Resuming a request elsewhere (`resumed=k`): a node that is handed the prompt plus the first k
output tokens of a request must go on exactly as the node that produced them would have: the
same tokens (greedy and seeded, penalties included), text that continues where the stream's
shown text stopped (held-back stop-string tails and split characters included), and usage that
counts the whole output. The gateway's mid-stream migration rests on this."""

from __future__ import annotations

import pytest

from engine.engine import Engine, RequestOutput
from engine.sampling import SamplingParams
from tests.test_engine_oracle import assert_pages_released, new_llm, random_prompts
from tests.test_engine_pd import copy_pages

N = 12
SEEDED = SamplingParams(
    temperature=0.9, top_k=40, seed=11, max_tokens=N, ignore_eos=True, frequency_penalty=0.5
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)


def run(engine: Engine, rid: str, prompt: list[int], params: SamplingParams, resumed: int = 0):
    """Every output of one request, step by step."""
    engine.add_request(rid, prompt, params, resumed=resumed)
    outs: list[RequestOutput] = []
    while engine.has_work():
        outs.extend(o for o in engine.step() if o.rid == rid)
    return outs


def ids_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_resumed_request_continues_the_same_stream(make_tiny, params) -> None:
    llm = new_llm(make_tiny("llama"))
    prompt = random_prompts([23], len(llm.tokenizer), seed=3)[0]
    whole = run(llm.engine, "whole", prompt, params)
    assert len(ids_of(whole)) == N
    for k in (1, 5, N - 1):
        shown = "".join(o.text_delta for o in whole[:k])  # what a client had seen after k
        rest = run(llm.engine, f"resumed-{k}", prompt + ids_of(whole)[:k], params, resumed=k)
        assert ids_of(rest) == ids_of(whole)[k:]
        assert shown + "".join(o.text_delta for o in rest) == "".join(o.text_delta for o in whole)
        last = rest[-1]
        assert (last.finish_reason, last.completion_tokens) == ("length", N)
        assert last.prompt_tokens == len(prompt)
    assert_pages_released(llm)


@pytest.mark.parametrize("matches", [True, False], ids=["stop-matches", "false-alarm"])
def test_a_stop_string_across_the_cut_is_held_back_alike(make_tiny, matches: bool) -> None:
    """A tail that may grow into a stop string is held back; resumed after it, the new node must
    hold back the same characters: drop them if the stop string completes, send them if not."""
    llm = new_llm(make_tiny("llama"))
    prompt = random_prompts([17], len(llm.tokenizer), seed=5)[0]
    free = run(llm.engine, "free", prompt, GREEDY)
    texts = [o.text_delta for o in free]
    cut = next(i for i in range(3, N - 2) if texts[i] and texts[i + 1] and texts[i + 2])
    # from the end of token `cut`'s text into token cut+2's; or one that never completes
    tail = texts[cut + 1] + texts[cut + 2][:1] if matches else "\x00"
    stop = texts[cut][-1] + tail
    params = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, stop=[stop])
    whole = run(llm.engine, "whole", prompt, params)
    assert (whole[-1].matched_stop == stop) is matches
    expected = "".join(o.text_delta for o in whole)
    full = "".join(texts)
    assert expected == (full[: full.find(stop)] if matches else full)
    for k in range(1, len(whole)):
        shown = "".join(o.text_delta for o in whole[:k])
        rest = run(llm.engine, f"r{k}", prompt + ids_of(whole)[:k], params, resumed=k)
        assert shown + "".join(o.text_delta for o in rest) == expected, k
        assert rest[-1].matched_stop == whole[-1].matched_stop
        assert rest[-1].completion_tokens == len(whole)
    assert_pages_released(llm)


def test_prefill_and_decode_nodes_resume_together(make_tiny) -> None:
    path = make_tiny("llama")
    single, prefill, decode = new_llm(path), new_llm(path), new_llm(path)
    prompt = random_prompts([30], len(single.tokenizer), seed=9)[0]
    whole = ids_of(run(single.engine, "whole", prompt, SEEDED))
    k = 4
    sequence = prompt + whole[:k]
    prefill.engine.add_request("m", sequence, SEEDED, prefill_only=True, resumed=k)
    pages = decode.engine.reserve("m", sequence, SEEDED, headroom=8, resumed=k)
    assert pages is not None
    (out,) = prefill.engine.step()
    assert out.completion_tokens == k + 1 and out.prompt_tokens == len(prompt)
    copy_pages(prefill.engine.pool, prefill.engine.kv_pages("m"), decode.engine.pool, pages)
    prefill.engine.release("m")
    outs = [decode.engine.activate("m", out.new_token_ids[0])]
    while decode.engine.has_work():
        outs.extend(decode.engine.step())
    assert ids_of(outs) == whole[k:]
    assert outs[-1].completion_tokens == N
    assert_pages_released(prefill)
    assert_pages_released(decode)


def test_nothing_left_to_resume_is_refused(make_tiny) -> None:
    llm = new_llm(make_tiny("llama"))
    with pytest.raises(ValueError, match="nothing would be left to generate"):
        llm.engine.add_request("x", [5, 6, 7, 8], SamplingParams(max_tokens=2), resumed=2)
    with pytest.raises(ValueError, match="nothing would be left to generate"):
        llm.engine.check_request([5, 6], SamplingParams(max_tokens=9), resumed=2)
