"""Sampling and stop handling: fast CPU tests on crafted logits, no model."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from engine import logit_filters
from engine.logit_filters import apply_min_p, apply_penalties, apply_top_k_top_p
from engine.sampler import Sampler, plain_greedy
from engine.sampling import SamplerState, SamplingParams
from engine.stop import StopChecker, find_stop_string, stop_hold_back

EOS = 0


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    states: list[SamplerState] | None = None,
    sampler: Sampler | None = None,
):
    states = states or [SamplerState.create(p, []) for p in params]
    return (sampler or Sampler(frozenset({EOS}), seed=0))(logits, params, states)


def draws(logits_row: list[float], params: SamplingParams, n: int = 4000) -> list[int]:
    """``n`` independent draws for one logits row (as a batch of ``n`` identical rows)."""
    logits = torch.tensor([logits_row]).repeat(n, 1)
    return sample(logits, [params] * n).token_ids


def log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


# --- truncation never leaves its set -------------------------------------------------------------


def test_top_k_picks_only_the_k_best() -> None:
    row = torch.randn(64, generator=torch.Generator().manual_seed(1)).tolist()
    allowed = set(torch.tensor(row).topk(5).indices.tolist())
    picked = draws(row, SamplingParams(top_k=5, temperature=2.0))
    assert set(picked) == allowed


def test_top_k_keeps_exactly_k_and_breaks_ties_towards_lower_ids() -> None:
    kept = apply_top_k_top_p(torch.zeros(1, 10), torch.tensor([3]), None)
    assert torch.isfinite(kept[0]).nonzero().flatten().tolist() == [0, 1, 2]


def test_top_k_alone_keeps_what_the_sorted_path_keeps() -> None:
    """Top-k without top-p takes no sort: the same tokens survive as the sorted path's (ties on
    the k-th value included, -inf rows, k of 0 and past the vocabulary)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 6, (6, 50), generator=gen).float()  # many ties
    logits[4, 10:] = float("-inf")
    top_k = torch.tensor([1, 7, 0, 50, 20, 99])
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)
    dropped = torch.arange(50)[None, :] >= torch.where(top_k > 0, top_k, 50)[:, None]
    sorted_path = logits.scatter(-1, order, ordered.masked_fill(dropped, float("-inf")))
    assert torch.equal(apply_top_k_top_p(logits, top_k, None), sorted_path)
    assert torch.isfinite(sorted_path).sum(dim=-1).tolist() == [1, 7, 50, 50, 10, 50]


@pytest.mark.parametrize("candidates", [1024, 8], ids=["nucleus-inside", "sort-fallback"])
def test_top_p_from_the_best_candidates_keeps_what_the_full_sort_keeps(
    monkeypatch: pytest.MonkeyPatch, candidates: int
) -> None:
    """Top-p looks for the nucleus among each row's best candidates first: the same tokens
    survive as with a sort of the whole row (ties at the cut, top-k before it, p of 1), and a
    row whose nucleus is wider than the candidates takes the sort."""
    monkeypatch.setattr(logit_filters, "NUCLEUS_CANDIDATES", candidates)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 40, (5, 3000), generator=gen).float()  # peaked, many ties
    top_p = torch.tensor([0.5, 0.9, 1.0, 0.99, 0.3])
    top_k = torch.tensor([0, 0, 0, 0, 3])
    expected = logit_filters.sorted_top_p(logit_filters.apply_top_k(logits, top_k), top_p)
    assert torch.equal(apply_top_k_top_p(logits, top_k, top_p), expected)
    assert torch.isfinite(expected).sum(dim=-1)[2] == 3000  # p = 1 keeps everything


def test_greedy_rows_beside_them_change_no_seeded_draw() -> None:
    """Only sampled rows are truncated and drawn: a seeded row draws the same tokens alone and
    beside greedy rows, anywhere in the batch."""
    row = torch.randn(1, 300, generator=torch.Generator().manual_seed(4))
    seeded = SamplingParams(temperature=0.9, top_k=40, seed=11)
    greedy = SamplingParams(temperature=0)
    alone = sample(row, [seeded]).token_ids[0]
    batch = sample(row.repeat(3, 1), [greedy, seeded, greedy]).token_ids
    assert batch == [int(row.argmax()), alone, int(row.argmax())]


@pytest.mark.parametrize(("top_p", "allowed"), [(0.75, {0, 1, 2}), (0.65, {0, 1}), (0.3, {0})])
def test_top_p_picks_only_the_nucleus(top_p: float, allowed: set[int]) -> None:
    row = log_probs([0.4, 0.3, 0.2, 0.05, 0.05])
    assert set(draws(row, SamplingParams(top_p=top_p))) == allowed


@pytest.mark.parametrize(("min_p", "allowed"), [(0.25, {0, 1, 2}), (0.4, {0, 1}), (1.0, {0})])
def test_min_p_picks_only_tokens_near_the_best(min_p: float, allowed: set[int]) -> None:
    row = log_probs([0.5, 0.25, 0.15, 0.1])
    assert set(draws(row, SamplingParams(min_p=min_p))) == allowed


def test_top_p_applies_to_the_renormalized_top_k() -> None:
    # After top-k=3 the mass is [0.4, 0.3, 0.2] / 0.9; the first two hold 0.78 < 0.8.
    row = log_probs([0.4, 0.3, 0.2, 0.1])
    assert set(draws(row, SamplingParams(top_k=3, top_p=0.8))) == {0, 1, 2}
    assert set(draws(row, SamplingParams(top_k=3, top_p=0.75))) == {0, 1}


def test_truncation_is_per_row() -> None:
    row = log_probs([0.4, 0.3, 0.2, 0.1])
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.5), SamplingParams(min_p=0.6)]
    params += [SamplingParams()]
    picked = sample(torch.tensor([row] * 4).repeat(500, 1), params * 500).token_ids
    assert set(picked[0::4]) == {0}
    assert set(picked[1::4]) == {0, 1}
    assert set(picked[2::4]) == {0, 1}
    assert set(picked[3::4]) == {0, 1, 2, 3}


def test_min_p_zero_keeps_everything() -> None:
    logits = torch.tensor([[0.0, -30.0, float("-inf")]])
    assert apply_min_p(logits, torch.tensor([0.0])).tolist() == logits.tolist()


# --- greedy --------------------------------------------------------------------------------------


def test_greedy_equals_argmax() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    out = sample(logits, [SamplingParams(temperature=0.0)] * 8)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_ties_go_to_the_lowest_id() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [7.0, 7.0, 7.0, 7.0]])
    assert sample(logits, [SamplingParams(temperature=0.0)] * 2).token_ids == [1, 0]


def test_greedy_rows_stay_argmax_in_a_mixed_batch() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 3
    picked = sample(logits, params).token_ids
    assert picked[0::2] == logits[0::2].argmax(dim=-1).tolist()


def test_bfloat16_logits_are_accepted() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4)).bfloat16()
    out = sample(logits, [SamplingParams(temperature=0.0)] * 3)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()


# --- seeds ---------------------------------------------------------------------------------------


def run_steps(
    batch: list[SamplingParams], watch: int, steps: int = 12, sampler_seed: int = 0
) -> list[int]:
    """Tokens of row ``watch`` over ``steps`` steps on flat logits, each row's tokens appended."""
    sampler = Sampler(frozenset({EOS}), seed=sampler_seed)
    states = [SamplerState.create(p, [1, 2, 3]) for p in batch]
    tokens = []
    for _ in range(steps):
        out = sampler(torch.zeros(len(batch), 1000), batch, states)
        for state, token in zip(states, out.token_ids, strict=True):
            state.append(token)
        tokens.append(out.token_ids[watch])
    return tokens


def test_same_seed_same_tokens_across_batches_and_positions() -> None:
    seeded = SamplingParams(seed=42, top_k=500, temperature=0.9)
    alone = run_steps([seeded], watch=0)
    others = [SamplingParams(), SamplingParams(seed=7), SamplingParams(temperature=0.0)]
    assert run_steps([*others, seeded], watch=3, sampler_seed=1) == alone
    assert run_steps([seeded, *others[:1]], watch=0, sampler_seed=2) == alone
    assert run_steps([others[1], seeded, seeded], watch=2) == alone


def test_different_seeds_differ() -> None:
    first = run_steps([SamplingParams(seed=1)], watch=0)
    assert first != run_steps([SamplingParams(seed=2)], watch=0)
    assert len(set(first)) > 1


def test_seeded_request_resumes_on_another_sampler() -> None:
    """A decode node continuing a prefill node's request draws what one node would have drawn."""
    params = SamplingParams(seed=5)
    whole = run_steps([params], watch=0, steps=4)
    state = SamplerState.create(params, [1, 2, 3])
    for token in whole[:3]:
        state.append(token)
    resumed = Sampler(frozenset({EOS}), seed=99)(torch.zeros(1, 1000), [params], [state])
    assert resumed.token_ids == whole[3:]


def test_unseeded_requests_follow_the_sampler_seed() -> None:
    assert run_steps([SamplingParams()] * 3, 1, sampler_seed=3) == run_steps(
        [SamplingParams()] * 3, 1, sampler_seed=3
    )


# --- temperature ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draw_frequencies_follow_softmax_of_scaled_logits(temperature: float) -> None:
    row = [2.0, 1.0, 0.0]
    picked = draws(row, SamplingParams(temperature=temperature), n=20000)
    expected = torch.tensor(row).div(temperature).softmax(-1).tolist()
    for token, p in enumerate(expected):
        assert abs(picked.count(token) / len(picked) - p) < 0.015


def test_lower_temperature_sharpens() -> None:
    row = [2.0, 1.0, 0.0]
    share = [draws(row, SamplingParams(temperature=t)).count(0) for t in (0.25, 1.0, 4.0)]
    assert share[0] > share[1] > share[2]


# --- penalties -----------------------------------------------------------------------------------


def test_penalties_change_logits_exactly_as_defined() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    prompt_mask = torch.tensor([[True, False, False, False, True]])
    counts = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0]])
    out = apply_penalties(
        logits,
        prompt_mask,
        counts,
        repetition=torch.tensor([2.0]),
        frequency=torch.tensor([0.5]),
        presence=torch.tensor([0.25]),
    )
    # id0: prompt, 2/2.  id1: output, -1*2 - 0.5*2 - 0.25.  id2: untouched.
    # id3: output, 3/2 - 0.5 - 0.25.  id4: prompt, -2*2 (no frequency/presence: prompt only).
    assert out.tolist() == [[1.0, -3.25, 0.5, 0.75, -4.0]]


def test_neutral_penalties_change_nothing() -> None:
    logits = torch.randn(2, 7, generator=torch.Generator().manual_seed(5))
    out = apply_penalties(
        logits,
        torch.ones(2, 7, dtype=torch.bool),
        torch.full((2, 7), 3.0),
        repetition=torch.ones(2),
        frequency=torch.zeros(2),
        presence=torch.zeros(2),
    )
    assert torch.equal(out, logits)


def test_sampler_applies_penalties_from_state() -> None:
    params = SamplingParams(
        temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    state = SamplerState.create(params, [0, 4, 0])
    for token in (1, 1, 3):
        state.append(token)
    plain = SamplingParams(temperature=0.0, logprobs=5)
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]] * 2)
    penalized_params = dataclasses.replace(params, logprobs=5)
    out = Sampler(frozenset())(
        logits, [penalized_params, plain], [state, SamplerState.create(plain, [0, 4])]
    )
    expected = torch.tensor([1.0, -3.25, 0.5, 0.75, -4.0]).log_softmax(-1)
    assert out.token_ids == [0, 3]
    assert out.top_logprobs is not None
    assert dict(out.top_logprobs[0]) == pytest.approx(dict(enumerate(expected.tolist())))
    assert logits[0].tolist() == [2.0, -1.0, 0.5, 3.0, -2.0], "input logits must not change"


def test_presence_and_frequency_ignore_the_prompt() -> None:
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    state = SamplerState.create(params, [0] * 10)
    assert sample(torch.tensor([[3.0, 2.0]]), [params], [state]).token_ids == [0]
    state.append(0)
    assert sample(torch.tensor([[3.0, 2.0]]), [params], [state]).token_ids == [1]


# --- logprobs ------------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_and_top_k_sorted() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(6))
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.7, logprobs=5, seed=1),
        SamplingParams(logprobs=0, seed=2),
        SamplingParams(),
    ]
    out = sample(logits, params)
    reference = logits.log_softmax(-1)
    assert out.logprobs is not None and out.top_logprobs is not None
    for row, token in enumerate(out.token_ids):
        assert out.logprobs[row] == pytest.approx(reference[row, token].item(), abs=1e-6)
    for row, n in enumerate([3, 5, 0, 0]):
        top = out.top_logprobs[row]
        assert [t for t, _ in top] == reference[row].topk(n).indices.tolist()
        assert [v for _, v in top] == pytest.approx(reference[row].topk(n).values.tolist())
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert out.top_logprobs[0][0][0] == out.token_ids[0]


def test_logprobs_do_not_depend_on_temperature_or_truncation() -> None:
    row = log_probs([0.5, 0.3, 0.2])
    params = SamplingParams(temperature=0.3, top_k=2, logprobs=3, seed=3)
    out = sample(torch.tensor([row]), [params])
    assert out.top_logprobs is not None
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(row, abs=1e-6)


# --- min_tokens ----------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    state = SamplerState.create(params, [5])
    logits = torch.tensor([[9.0, 8.0, 1.0, 0.0]])
    assert sample(logits, [params], [state]).token_ids == [2]
    state.append(2)
    assert sample(logits, [params], [state]).token_ids == [2]
    state.append(2)
    assert sample(logits, [params], [state]).token_ids == [EOS]


def test_min_tokens_with_ignore_eos_leaves_eos_alone() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[1])
    logits = torch.tensor([[8.0, 9.0, 1.0]] * 2)
    assert sample(logits, [params, SamplingParams(temperature=0.0)]).token_ids == [EOS, 1]


# --- logit bias ----------------------------------------------------------------------------------


def test_logit_bias_moves_greedy_and_sampled_rows_alike() -> None:
    logits = torch.tensor([[9.0, 8.0, 1.0, 0.0]] * 3)
    forced = SamplingParams(temperature=0.0, logit_bias={"3": 100})
    banned = SamplingParams(temperature=0.0, logit_bias={"0": -100})
    sampled = SamplingParams(temperature=1.0, seed=3, logit_bias={"2": 100})
    assert sample(logits, [forced, banned, sampled]).token_ids == [3, 1, 2]
    # a row without bias beside them keeps its argmax
    assert sample(logits[:2], [forced, SamplingParams(temperature=0.0)]).token_ids == [3, 0]


def test_logprobs_are_of_the_biased_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, logprobs=1, logit_bias=[(2, 5.0)])
    out = sample(logits, [params])
    expected = torch.tensor([[2.0, 1.0, 5.0]]).log_softmax(-1)[0, 2].item()
    assert out.token_ids == [2] and out.logprobs[0] == pytest.approx(expected)


def test_a_biased_request_never_takes_the_plain_argmax() -> None:
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logit_bias={"1": 1})]
    states = [SamplerState.create(p, []) for p in params]
    assert plain_greedy(params[:1], states[:1])
    assert not plain_greedy(params, states)


@pytest.mark.parametrize(
    ("bias", "says"),
    [
        ({"5": 100.5}, r"logit_bias must map tokens to biases in \[-100, 100\]"),
        ({"32": 1}, r"logit_bias must name token ids in \[0, 32\), got 32"),
        ({"-1": 1}, r"logit_bias must name token ids in \[0, 32\), got -1"),
        ({"x": 1}, "logit_bias must map token ids to numbers"),
        ({"5": "high"}, "logit_bias must map token ids to numbers"),
    ],
)
def test_bad_logit_bias_is_named(bias: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        SamplingParams(logit_bias=bias).validate(vocab_size=32)


# --- stop handling -------------------------------------------------------------------------------


def checker(**kwargs) -> StopChecker:
    return StopChecker(SamplingParams(max_tokens=100, **kwargs), frozenset({EOS}))


def feed(stop: StopChecker, deltas: list[str], token_id: int = 7):
    """Feed text deltas one token each; return every step's result (stopping at the finish)."""
    text, results = "", []
    for n, delta in enumerate(deltas, start=1):
        text += delta
        results.append(stop.check(token_id, n, text, len(delta)))
        if results[-1].finished:
            break
    return results


def test_stop_string_spanning_two_deltas_is_cut_exactly() -> None:
    first, second = feed(checker(stop=["END"]), ["foo E", "ND bar"])
    assert not first.finished and first.hold_back == 1 and first.streamable_text == "foo "
    assert (second.finish_reason, second.matched_stop, second.text) == ("stop", "END", "foo ")
    assert second.hold_back == 0


def test_stop_string_at_the_very_start() -> None:
    (result,) = feed(checker(stop="STOP"), ["STOP and more"])
    assert (result.finish_reason, result.text) == ("stop", "")


def test_earliest_stop_string_wins_whatever_the_list_order() -> None:
    (result,) = feed(checker(stop=["b", "xyz"]), ["a xyz b"])
    assert (result.matched_stop, result.text) == ("xyz", "a ")
    (result,) = feed(checker(stop=["abc", "ab"]), ["zabc"])
    assert (result.matched_stop, result.text) == ("ab", "z")


def test_include_stop_str_in_output_keeps_it() -> None:
    *_, result = feed(checker(stop=["END"], include_stop_str_in_output=True), ["foo E", "ND bar"])
    assert (result.finish_reason, result.text) == ("stop", "foo END")


def test_stop_strings_are_searched_only_in_the_new_tail() -> None:
    assert find_stop_string("END and more", 3, ["END"]) is None
    assert find_stop_string("xx EN", 0, ["EN"]) is None
    assert find_stop_string("xx END", 1, ["END"]) == (3, "END")


def test_stop_token_id_and_eos_finish_and_drop_their_text() -> None:
    result = checker(stop_token_ids=[9]).check(9, 1, "hi<|end|>", 7)
    assert (result.finish_reason, result.matched_stop, result.text) == ("stop", 9, "hi")
    result = checker().check(EOS, 3, "hi</s>", 4)
    assert (result.finish_reason, result.matched_stop, result.text) == ("stop", EOS, "hi")
    result = checker(include_stop_str_in_output=True).check(EOS, 3, "hi</s>", 4)
    assert result.text == "hi</s>"
    assert not checker(ignore_eos=True).check(EOS, 3, "hi", 0).finished


def test_max_tokens_finishes_with_length_unless_a_stop_string_also_ends() -> None:
    stop = StopChecker(SamplingParams(max_tokens=2, stop=["!"]))
    assert not stop.check(5, 1, "ab", 2).finished
    result = stop.check(5, 2, "abcd", 2)
    assert (result.finish_reason, result.matched_stop, result.text) == ("length", None, "abcd")
    result = stop.check(5, 2, "ab!d", 2)
    assert (result.finish_reason, result.matched_stop, result.text) == ("stop", "!", "ab")


def test_nothing_stops_before_min_tokens() -> None:
    stop = checker(stop=["x"], stop_token_ids=[9], min_tokens=2)
    assert not stop.check(EOS, 1, "x", 1).finished
    assert not stop.check(9, 2, "xx", 1).finished
    assert stop.check(EOS, 3, "xxy", 1).finished


@pytest.mark.parametrize(
    ("text", "expected"),
    [("xxab", 2), ("xxabc", 3), ("xxa", 1), ("xx", 0), ("", 0), ("b", 0), ("abcd", 0), ("xq", 1)],
)
def test_hold_back_is_the_longest_tail_that_starts_a_stop_string(text: str, expected: int) -> None:
    assert stop_hold_back(text, ["abcd", "qr"]) == expected


def test_streamed_text_never_shows_text_that_is_cut_later() -> None:
    rng = random.Random(0)
    stops = ["aab", "ba", "bbb"]
    for _ in range(300):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(1, 12)))
        deltas, start = [], 0
        while start < len(text):
            size = rng.randint(0, 3)
            deltas.append(text[start : start + size])
            start += size
        results = feed(checker(stop=stops), deltas)
        final = results[-1].text
        for result in results:
            assert final.startswith(result.streamable_text)
        assert not any(s in final for s in stops)
        if not results[-1].finished:
            assert final == text


def test_char_by_char_streaming_cuts_at_the_first_completed_stop() -> None:
    rng = random.Random(1)
    stops = ["aab", "ba", "bbb"]
    for _ in range(200):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(1, 12)))
        assert feed(checker(stop=stops), list(text))[-1].text == cut_at_first_completed(text, stops)


def cut_at_first_completed(text: str, stops: list[str]) -> str:
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return text[: end - len(stop)]
    return text


# --- parameters ----------------------------------------------------------------------------------


def test_params_normalize_lists_and_strings() -> None:
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2])  # type: ignore[arg-type]
    assert params.stop == ("a", "b") and params.stop_token_ids == (1, 2)
    assert SamplingParams(stop="end").stop == ("end",)  # type: ignore[arg-type]
    assert hash(params) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(1, 2)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.top_k = 3  # type: ignore[misc]


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


def test_max_tokens_error_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"max_tokens must be >= 1, got 0 \(ask for at least"):
        SamplingParams(max_tokens=0).validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -3),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("repetition_penalty", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("presence_penalty", 3.0),
        ("presence_penalty", -3.0),
        ("logprobs", -1),
        ("logprobs", 21),
        ("min_tokens", -1),
        ("min_tokens", 17),
        ("stop", ("",)),
        ("stop_token_ids", (-1,)),
        ("ignore_eos", "maybe"),
        ("skip_special_tokens", 1),
        ("include_stop_str_in_output", "yes"),
    ],
)
def test_bad_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must .*\(.+\)$"):
        SamplingParams(**{field: value}).validate()  # type: ignore[arg-type]


def test_max_tokens_beyond_the_context_is_rejected() -> None:
    SamplingParams(max_tokens=64).validate(max_model_len=64)
    with pytest.raises(ValueError, match="max_tokens must be <= max_model_len 64"):
        SamplingParams(max_tokens=65).validate(max_model_len=64)


def test_good_params_validate() -> None:
    SamplingParams(
        temperature=0.0, top_p=1.0, top_k=0, min_p=1.0, logprobs=20, min_tokens=16
    ).validate()


def test_sampler_rejects_mismatched_batches() -> None:
    with pytest.raises(ValueError, match="one params and one state per logits row"):
        sample(torch.zeros(2, 5), [SamplingParams()], [SamplerState.create(SamplingParams(), [])])
