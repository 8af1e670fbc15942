from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from scalellm.engine import sampler as sampler_module
from scalellm.engine.request import Request
from scalellm.engine.sampler import Sampler, SamplerKernels, truncate
from scalellm.types import SamplingParams


def _reqs(*params: SamplingParams) -> list[Request]:
    return [Request(f"r{i}", [1], p, max_tokens=8) for i, p in enumerate(params)]


def _logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def test_greedy_is_argmax(make_sampler: Callable[[], Sampler]) -> None:
    logits = _logits()
    out = make_sampler()(logits, _reqs(*[SamplingParams(temperature=0.0)] * 4))
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("argmax", [None, "kernel"])
def test_bfloat16_logits_sample_as_their_float32_values(argmax: str | None) -> None:
    """The runner hands over logits in the model's dtype: plain greedy rows take their argmax as
    they are, anything else (here a row that wants logprobs) works on float32, and both give
    what the float32 logits give."""
    from scalellm.engine import cpu_kernels

    if argmax and not cpu_kernels.available():
        pytest.skip("no C++ toolchain for the CPU kernels")
    logits = _logits(rows=4, vocab=300).to(torch.bfloat16)
    wide = logits.float()
    sampler = Sampler(
        torch.device("cpu"), SamplerKernels(argmax=cpu_kernels.argmax) if argmax else SamplerKernels()
    )
    greedy = _reqs(*[SamplingParams(temperature=0.0)] * 4)
    assert sampler(logits, greedy).token_ids == wide.argmax(-1).tolist()
    mixed = _reqs(SamplingParams(temperature=0.0, logprobs=2), *[SamplingParams(temperature=0.0)] * 3)
    got, want = sampler(logits, mixed), Sampler(torch.device("cpu"))(wide, mixed)
    assert got.token_ids == want.token_ids == wide.argmax(-1).tolist()
    assert got.logprobs == want.logprobs and got.logprobs[0] is not None


def test_seeded_rows_are_reproducible_whatever_the_batch(make_sampler: Callable[[], Sampler]) -> None:
    logits = _logits(rows=3) / 3
    seeded = SamplingParams(temperature=1.0, seed=1234)
    first = make_sampler()
    alone = [first(logits[1:2], _reqs(seeded)).token_ids[0] for _ in range(20)]
    second = make_sampler()
    # The first row's top-k makes the batch sort its rows: the seeded row's draws must not care.
    batch = _reqs(SamplingParams(temperature=0.7, top_k=5), seeded, SamplingParams(temperature=0.0))
    batch[1].request_id = "r0"  # same request id -> same generator stream as `alone`
    mixed = [second(logits, batch).token_ids[1] for _ in range(20)]
    assert alone == mixed
    assert len(set(alone)) > 1  # it does sample, not argmax


def test_a_seeded_row_draws_with_one_uniform_of_its_own_a_token() -> None:
    """With the CPU kernels a seeded row's token is the kernel's draw with the next uniform of
    its request's generator, one a token, whatever else is in the batch; a request continued by
    another sampler (disaggregated decode) skips one uniform per token it already has."""
    from scalellm.engine import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C++ toolchain for the CPU kernels")
    cpu = torch.device("cpu")
    logits = _logits(rows=3, vocab=300) / 2
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=77)
    sampler = Sampler(cpu, cpu_kernels.sampler_kernels(cpu))
    batch = _reqs(SamplingParams(temperature=0.7), seeded, SamplingParams(temperature=1.2, seed=5))
    gen = torch.Generator().manual_seed(77)
    got, want = [], []
    for _ in range(12):
        u = torch.empty(1).uniform_(generator=gen)
        want.append(cpu_kernels.sample(logits[1:2], [0.9], [0], [0.95], [0.0], u).item())
        got.append(sampler(logits, batch).token_ids[1])
        batch[1].append_token(got[-1])
    assert got == want and len(set(got)) > 1
    later = Request("r1", [1], seeded, max_tokens=8)
    for token in got[:7]:
        later.append_token(token)
    elsewhere = Sampler(cpu, cpu_kernels.sampler_kernels(cpu))
    assert [elsewhere(logits[1:2], [later]).token_ids[0] for _ in range(5)] == got[7:]


def test_top_k_one_tiny_top_p_and_tiny_temperatures_reduce_to_argmax(
    make_sampler: Callable[[], Sampler],
) -> None:
    logits = _logits()
    sampler = make_sampler()
    tiny = (SamplingParams(temperature=1e-46), SamplingParams(temperature=5e-6, top_p=0.9))  # greedy, not NaN
    for params in (
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        *tiny,
    ):
        for _ in range(5):
            assert sampler(logits, _reqs(*[params] * 4)).token_ids == logits.argmax(-1).tolist()


def test_top_k_keeps_only_the_k_best(make_sampler: Callable[[], Sampler]) -> None:
    logits = _logits(rows=1, vocab=100)
    allowed = set(logits[0].topk(3).indices.tolist())
    sampler = make_sampler()
    seen = {sampler(logits, _reqs(SamplingParams(temperature=2.0, top_k=3))).token_ids[0] for _ in range(200)}
    assert seen <= allowed and len(seen) == 3


def test_top_p_and_min_p_cut_the_tail(make_sampler: Callable[[], Sampler]) -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    sampler = make_sampler()
    seen_p = {sampler(logits, _reqs(SamplingParams(top_p=0.8))).token_ids[0] for _ in range(300)}
    assert seen_p == {0, 1}  # 0.5 + 0.3 reaches 0.8: the tail is cut
    seen_m = {sampler(logits, _reqs(SamplingParams(min_p=0.25))).token_ids[0] for _ in range(300)}
    assert seen_m == {0, 1, 2}  # below 0.25 * 0.5 = 0.125 is dropped


def test_sampling_follows_the_distribution(make_sampler: Callable[[], Sampler]) -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    sampler = make_sampler()
    picks = [sampler(logits, _reqs(SamplingParams(seed=None))).token_ids[0] for _ in range(2000)]
    assert 0.70 < sum(picks) / len(picks) < 0.80


def test_logprobs_are_raw_log_softmax(make_sampler: Callable[[], Sampler]) -> None:
    logits = _logits(rows=2)
    out = make_sampler()(logits, _reqs(SamplingParams(temperature=0.0, logprobs=3), SamplingParams()))
    lp = out.logprobs[0]
    ref = logits[0].log_softmax(-1)
    assert lp is not None and lp.token_id == out.token_ids[0]
    assert lp.logprob == pytest.approx(ref.max().item(), abs=1e-5)
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
    assert out.logprobs[1] is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"seed": -1}, "seed"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_parameters_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_the_token_that_stopped_the_output_is_not_shown() -> None:
    eos = frozenset({2})
    params = SamplingParams(stop_token_ids=(13,))
    assert params.shown_ids([5, 6, 2], True, eos) == [5, 6] and params.shown_ids([5, 13], True, eos) == [5]
    assert params.shown_ids([5, 6], True, eos) == [5, 6]  # stopped by a grammar's last token: shown
    assert params.shown_ids([5, 2], False, eos) == [5, 2]  # not a stop (max_tokens on an EOS)
    assert SamplingParams(ignore_eos=True).shown_ids([5, 2], True, eos) == [5, 2]
    assert SamplingParams(include_stop_str_in_output=True).shown_ids([5, 2], True, eos) == [5, 2]
    assert params.stops_on(2, eos) and params.stops_on(13, eos) and not params.stops_on(5, eos)


def _wide_logits(rows: int, vocab: int, spread: float, seed: int) -> torch.Tensor:
    """Logits over a vocabulary wider than sampler.CANDIDATES' rungs: peaked (spread large) or flat."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * spread


def test_truncation_over_candidates_keeps_what_a_sort_of_the_vocabulary_keeps() -> None:
    """top-k / top-p look at a row's 1024 largest logits, not a sort of the vocabulary: the
    kept tokens and their probabilities are those the whole sorted vocabulary gives; a row whose
    top-p mass reaches past the candidates (a flat distribution) is reported incomplete."""
    vocab, width = 3072, 1024
    peaked, flat = _wide_logits(1, vocab, 4.0, 1), _wide_logits(1, vocab, 0.1, 2)
    logits = torch.cat([peaked, peaked, flat])
    top_k, top_p = [vocab, 40, vocab], [0.9, 0.95, 0.9]
    probs, ids, complete = truncate(logits, top_k, top_p, width)
    full_probs, full_ids, full_complete = truncate(logits, top_k, top_p, vocab)
    assert complete.tolist() == [True, True, False] and full_complete.all()
    for row in (0, 1):
        kept = probs[row] > 0
        assert 1 < int(kept.sum()) < width
        assert torch.equal(ids[row][kept], full_ids[row][full_probs[row] > 0])
        torch.testing.assert_close(probs[row][kept], full_probs[row][full_probs[row] > 0], rtol=1e-6, atol=0)
    assert int((probs[1] > 0).sum()) <= 40
    assert int((full_probs[2] > 0).sum()) > width  # the flat row needs more


def test_sampling_over_candidates_draws_what_a_full_sort_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded draws of rows that stop at the first rung (64 candidates), at the second (1024), at
    the whole vocabulary (a flat row), a top_k wider than both, and a row without truncation, in
    one batch: the same tokens as with every row sorted over the whole vocabulary, and as each
    row alone."""
    vocab = 3072
    logits = torch.cat(
        [_wide_logits(1, vocab, s, seed) for s, seed in ((4.0, 3), (0.1, 4), (2.0, 5), (2.0, 6), (1.0, 7))]
    )
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(temperature=1.0, top_p=0.9, seed=8),  # flat: past 1024 candidates
        SamplingParams(temperature=1.0, top_k=vocab - 100, top_p=0.97, seed=9),  # a wider top_k
        SamplingParams(temperature=1.0, min_p=0.01, seed=10),  # no truncation
        SamplingParams(temperature=1.0, top_p=0.9, seed=11),  # past 64, within 1024
    ]
    widths: list[int] = []
    real = sampler_module.truncate

    def spy(logits: torch.Tensor, top_k: list[int], top_p: list[float], width: int) -> object:
        widths.append(width)
        return real(logits, top_k, top_p, width)

    monkeypatch.setattr(sampler_module, "truncate", spy)

    def draws(candidates: tuple[int, ...], rows: list[int]) -> list[list[int]]:
        monkeypatch.setattr(sampler_module, "CANDIDATES", candidates)
        sampler = Sampler(torch.device("cpu"))
        reqs = [Request(f"r{i}", [1], params[i], max_tokens=64) for i in rows]
        return [sampler(logits[rows], reqs).token_ids for _ in range(25)]

    batched = draws((64, 1024), [0, 1, 2, 3, 4])
    assert set(widths) == {64, 1024, vocab - 100, vocab}  # every rung taken
    assert batched == draws((vocab,), [0, 1, 2, 3, 4])
    for i in range(5):
        assert [step[i] for step in batched] == [step[0] for step in draws((64, 1024), [i])]
    ranks = logits[1].argsort(descending=True).argsort()
    assert max(int(ranks[step[1]]) for step in batched) >= 1024  # the flat row drew past the candidates


def test_an_unseeded_draw_never_picks_a_token_it_cut(
    monkeypatch: pytest.MonkeyPatch, make_sampler: Callable[[], Sampler]
) -> None:
    """The inverse-CDF draw at its extremes: u = 0 and u just under 1 (rounded up to the row's
    mass) land on the first and last tokens with p > 0, never on a cut one past them."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    for u, expected in ((0.0, {0}), (1.0 - 2.0**-24, {1})):
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u))
        seen = {make_sampler()(probs.log(), _reqs(SamplingParams(top_p=0.8))).token_ids[0]}
        assert seen == expected
