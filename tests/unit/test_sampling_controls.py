"""The sampler's logits controls against a reference written out token by token: penalties,
logit_bias, min_tokens, bad words, allowed_token_ids; and what they do to sampled tokens."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from scalellm.engine.logits_controls import LogitsControls, Penalize
from scalellm.engine.request import Request
from scalellm.engine.sampler import Sampler
from scalellm.types import SamplingParams

VOCAB = 40
EOS = 2


def _request(rid: str, params: SamplingParams, prompt: list[int], output: list[int] = ()) -> Request:  # type: ignore[assignment]
    req = Request(rid, prompt, params, max_tokens=64, eos_token_ids=frozenset({EOS}))
    for t in output:
        req.append_token(t)
    return req


@pytest.fixture(params=["torch", "kernel"])
def controls(request: pytest.FixtureRequest) -> Callable[[], LogitsControls]:
    """A LogitsControls maker: penalties by torch's ops, or by the C++ kernel (as the model
    runner's sampler builds it; skipped without a C++ toolchain)."""
    from scalellm.engine import cpu_kernels

    if request.param == "torch":
        return LogitsControls
    if not cpu_kernels.available():
        pytest.skip("no C++ toolchain for the CPU kernels")
    return lambda: LogitsControls(cpu_kernels.penalize)


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


def _reference(logits: list[float], req: Request) -> list[float]:
    """vLLM's order, one token at a time: allowed ids, bad words, min_tokens, bias, repetition,
    frequency, presence."""
    p = req.sampling_params
    out = list(logits)
    output = req.output_token_ids
    if p.allowed_token_ids:
        out = [v if t in p.allowed_token_ids else -math.inf for t, v in enumerate(out)]
    for seq in p.bad_words_token_ids:
        if len(seq) == 1 or output[len(output) - len(seq) + 1 :] == list(seq[:-1]):
            out[seq[-1]] = -math.inf
    if len(output) < p.min_tokens:
        for t in {*p.stop_token_ids, *([] if p.ignore_eos else [EOS])}:
            out[t] = -math.inf
    for t, b in p.logit_bias:
        out[t] += b
    for t in range(VOCAB):
        count = output.count(t)
        if count or t in req.prompt_token_ids:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        out[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def test_every_control_matches_the_reference_row_by_row(controls: Callable[[], LogitsControls]) -> None:
    logits = _logits(7)
    reqs = [
        _request("plain", SamplingParams(), [3, 4], [5]),
        _request("pen", SamplingParams(presence_penalty=0.5, frequency_penalty=0.7), [3, 4], [5, 5, 6, 9, 5]),
        _request("rep", SamplingParams(repetition_penalty=1.7), [3, 4, 11, 11], [5, 6]),
        _request(
            "all",
            SamplingParams(
                presence_penalty=-0.3,
                frequency_penalty=1.1,
                repetition_penalty=0.6,
                logit_bias={7: 4.5, 8: -2.0, 5: 1.0},
                min_tokens=4,
                stop_token_ids=(9,),
                bad_words_token_ids=[(12,), (5, 13), (6, 14)],
            ),
            [7, 3],
            [6, 5],
        ),
        _request("bias-only", SamplingParams(logit_bias={0: -100.0, 39: 100.0}), [1], []),
        _request("allowed", SamplingParams(allowed_token_ids=[30, 4, 7, 4]), [1], [4]),
        _request(
            "allowed+",
            SamplingParams(allowed_token_ids=[5, 6, 7], logit_bias={6: 3.0, 8: 2.0}, presence_penalty=1.0),
            [1],
            [5],
        ),
    ]
    processed = controls()(logits, reqs)
    for i, req in enumerate(reqs):
        expected = torch.tensor(_reference(logits[i].tolist(), req))
        torch.testing.assert_close(processed[i], expected, msg=req.request_id)
    assert processed[3, 13] == -math.inf and processed[3, 14] != -math.inf  # output ends with 5, not 6
    assert processed[3, 12] == -math.inf and processed[3, EOS] == -math.inf and processed[3, 9] == -math.inf
    assert [t for t in range(VOCAB) if processed[5, t] != -math.inf] == [4, 7, 30]
    assert [t for t in range(VOCAB) if processed[6, t] != -math.inf] == [5, 6, 7]
    torch.testing.assert_close(logits, _logits(7))  # the raw logits are not touched (logprobs use them)


def _random_batch(rows: int, seed: int) -> tuple[torch.Tensor, list[Request]]:
    """Random prompts and outputs (repeats, empty outputs, rows without penalties between them,
    -inf logits), each kind of penalty alone and together."""
    gen = torch.Generator().manual_seed(seed)
    logits = _logits(rows, seed=seed + 1)
    logits[::5, 7] = -math.inf
    reqs = []
    for i in range(rows):
        prompt = torch.randint(
            0, VOCAB, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen
        ).tolist()
        output = torch.randint(
            0, VOCAB, (int(torch.randint(0, 60, (1,), generator=gen)),), generator=gen
        ).tolist()
        kinds = [
            SamplingParams(),
            SamplingParams(presence_penalty=0.4 * (i % 3 - 1), frequency_penalty=0.3),
            SamplingParams(repetition_penalty=1.0 + 0.1 * i),
            SamplingParams(repetition_penalty=0.7, frequency_penalty=-0.2, presence_penalty=1.5),
        ]
        reqs.append(_request(f"r{i}", kinds[i % 4], prompt, output if i % 7 else []))
    return logits, reqs


def test_penalties_over_a_random_batch_match_the_reference(controls: Callable[[], LogitsControls]) -> None:
    """Penalties touch only the (row, token) pairs a request's prompt and output hold: a random
    batch against the reference, row by row."""
    logits, reqs = _random_batch(24, seed=4)
    processed = controls()(logits, reqs)
    for i, req in enumerate(reqs):
        expected = torch.tensor(_reference(logits[i].tolist(), req))
        torch.testing.assert_close(processed[i], expected, msg=req.request_id)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_penalties_kernel_gives_torchs_values_bit_for_bit(seed: int) -> None:
    """csrc/penalties.cpp against the torch path on the same random batches (a batch with and
    one without repetition penalties: the torch path's two branches): the same float32 bits."""
    from scalellm.engine import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C++ toolchain for the CPU kernels")
    logits, reqs = _random_batch(40, seed=seed)
    no_repetition = [r for r in reqs if r.sampling_params.repetition_penalty == 1.0]
    for batch in (reqs, no_repetition):
        rows = logits[: len(batch)]
        want, got = LogitsControls()(rows, batch), LogitsControls(cpu_kernels.penalize)(rows, batch)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_the_penalties_kernel_refuses_token_ids_outside_the_vocabulary() -> None:
    from scalellm.engine import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C++ toolchain for the CPU kernels")
    penalize: Penalize = cpu_kernels.penalize
    logits = _logits(2)
    with pytest.raises(RuntimeError, match="token id out of range"):
        penalize(logits, [1], [[3, VOCAB]], [1], [1.2], [0.0], [0.0])
    with pytest.raises(RuntimeError, match="row 0 out of range"):
        penalize(logits, [2], [[3]], [1], [1.2], [0.0], [0.0])
    torch.testing.assert_close(logits, _logits(2))  # refused before touching anything


def test_a_batch_without_controls_is_not_copied() -> None:
    logits = _logits(3)
    reqs = [_request(f"r{i}", SamplingParams(temperature=0.5, top_k=3), [1, 2], [3]) for i in range(3)]
    assert LogitsControls()(logits, reqs) is logits


def test_min_tokens_holds_back_eos_and_stop_ids_until_reached(make_sampler: Callable[[], Sampler]) -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 9] = 9.0
    sampler = make_sampler()
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(9,))
    for n in range(3):
        assert sampler(logits, [_request("m", params, [1], [20] * n)]).token_ids[0] not in (EOS, 9)
    assert sampler(logits, [_request("m", params, [1], [20] * 3)]).token_ids == [EOS]
    ignoring = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=(9,))
    assert sampler(logits, [_request("i", ignoring, [1])]).token_ids == [EOS]  # EOS does not stop it


def test_logit_bias_forces_and_bans_tokens_in_sampling(make_sampler: Callable[[], Sampler]) -> None:
    logits = _logits(1)
    sampler = make_sampler()
    forced = SamplingParams(temperature=1.0, logit_bias={17: 100.0})
    assert {sampler(logits, [_request("f", forced, [1])]).token_ids[0] for _ in range(50)} == {17}
    top = int(logits[0].argmax())
    banned = SamplingParams(temperature=0.0, logit_bias={top: -100.0})
    assert sampler(logits, [_request("b", banned, [1])]).token_ids[0] != top


def test_banned_ids_never_appear_in_samples(make_sampler: Callable[[], Sampler]) -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: every token is likely without the ban
    banned = list(range(0, VOCAB, 2))
    params = SamplingParams(temperature=1.0, bad_words_token_ids=[(t,) for t in banned])
    sampler = make_sampler()
    seen = {sampler(logits, [_request("b", params, [1])]).token_ids[0] for _ in range(300)}
    assert seen.isdisjoint(banned) and len(seen) > 10


def test_only_allowed_ids_are_sampled_greedy_or_not(make_sampler: Callable[[], Sampler]) -> None:
    logits = torch.zeros(2, VOCAB)  # uniform: every token is likely without the list
    logits[:, 0] = 50.0  # and token 0 would win every draw
    allowed = (3, 17, 31)
    sampler = make_sampler()
    reqs = [
        _request("s", SamplingParams(temperature=1.0, allowed_token_ids=allowed), [1]),
        _request("g", SamplingParams(temperature=0.0, allowed_token_ids=allowed), [1]),
    ]
    seen = [sampler(logits, reqs).token_ids for _ in range(200)]
    assert {row[0] for row in seen} == set(allowed)
    assert {row[1] for row in seen} == {3}  # greedy: the first of the tied allowed ids


def test_allowed_token_ids_are_checked_and_normalised() -> None:
    assert SamplingParams(allowed_token_ids=[9, 2, 9]).allowed_token_ids == (2, 9)
    assert SamplingParams(allowed_token_ids=[1]).uses_logits_controls
    assert not SamplingParams().uses_logits_controls
    for bad in ([-1], ["3"], [True], 5):
        with pytest.raises(ValueError, match="allowed_token_ids"):
            SamplingParams(allowed_token_ids=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "p_repeat"),
    [
        (SamplingParams(presence_penalty=math.log(3)), 0.25),  # 2 - ln 3 against 2: 1/3 : 1
        (SamplingParams(frequency_penalty=math.log(3) / 2), 0.25),  # counted twice: the same
        (SamplingParams(repetition_penalty=2.0), 1 / (1 + math.e)),  # 2 / 2 = 1 against 2
        (SamplingParams(logit_bias={0: math.log(3)}), 0.75),  # 3 : 1
    ],
)
def test_sampled_frequencies_follow_the_penalised_distribution(
    params: SamplingParams, p_repeat: float, make_sampler: Callable[[], Sampler]
) -> None:
    """Two live tokens of equal logits; token 0 is in the output (twice), token 1 is in neither
    prompt nor output. Token 0's sampled share is the softmax of the controlled logits, as
    vLLM's formulas give it."""
    logits = torch.tensor([[2.0, 2.0, -math.inf]])
    req = _request("d", params, [2], [0, 0] if params.frequency_penalty else [0])
    sampler = make_sampler()
    picks = [sampler(logits, [req]).token_ids[0] for _ in range(3000)]
    share = picks.count(0) / len(picks)
    assert abs(share - p_repeat) < 0.035, share


def test_penalties_change_greedy_choice_and_leave_logprobs_raw(make_sampler: Callable[[], Sampler]) -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 1.0]])
    sampler = make_sampler()
    plain = SamplingParams(temperature=0.0, logprobs=1)
    penalised = SamplingParams(temperature=0.0, logprobs=1, presence_penalty=0.2)
    assert sampler(logits, [_request("a", plain, [3], [0])]).token_ids == [0]
    out = sampler(logits, [_request("b", penalised, [3], [0])])
    assert out.token_ids == [1]
    lp = out.logprobs[0]
    assert lp is not None
    assert lp.logprob == pytest.approx(float(logits[0].log_softmax(-1)[1]))
