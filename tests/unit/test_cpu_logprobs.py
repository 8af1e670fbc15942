"""csrc/logprobs.cpp (cpu_kernels.logprobs) against torch's log_softmax and topk in float64: the
chosen tokens' logprobs, the top k values largest first with ties in vocabulary order, and the
same answer whatever else is in the batch."""

from __future__ import annotations

import math

import pytest
import torch

from scalellm.engine import cpu_kernels
from scalellm.engine.request import Request
from scalellm.engine.sampler import Sampler, SamplerKernels
from scalellm.types import SamplingParams

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ toolchain for the CPU kernels")

VOCAB = 3001  # not a multiple of the vector width: the scalar tail runs too


def _rows(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Peaked and flat rows; bfloat16 leaves many ties among the top values."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([0.5, 3.0, 12.0] * n)[:n].unsqueeze(1)
    x = torch.randn(n, VOCAB, generator=g) * spread
    x[1::2, 7::5] = -math.inf  # a row's logits may hold -inf
    return x.to(dtype)


def _reference(
    x: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 log-softmax at tokens, and the k largest: a stable sort, ties in vocabulary order."""
    lp = x.double().log_softmax(dim=-1)
    values, ids = lp.sort(dim=-1, descending=True, stable=True)
    return lp.gather(1, tokens.unsqueeze(1)).squeeze(1), values[:, :k], ids[:, :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_the_kernel_gives_log_softmax_and_its_top_k(dtype: torch.dtype, k: int) -> None:
    x = _rows(9, dtype)
    tokens = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(1))
    tokens[1] = 7  # a -inf logit: -inf logprob
    chosen, values, ids = cpu_kernels.logprobs(x, tokens, k)
    want_chosen, want_values, want_ids = _reference(x, tokens, k)
    assert chosen.dtype == values.dtype == torch.float32 and ids.dtype == torch.long
    assert values.shape == ids.shape == (9, k)
    assert chosen[1].item() == -math.inf
    finite = torch.isfinite(want_chosen)
    torch.testing.assert_close(chosen[finite].double(), want_chosen[finite], rtol=0, atol=1e-5)
    torch.testing.assert_close(values.double(), want_values, rtol=0, atol=1e-5)
    assert torch.equal(ids, want_ids)  # ties included: in vocabulary order
    if dtype == torch.bfloat16 and k == 20:
        ties = (x.float().gather(1, ids)[:, 1:] == x.float().gather(1, ids)[:, :-1]).sum()
        assert ties > 0  # the order of ties was tested


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chosen_token_among_the_top_has_the_same_logprob_there(dtype: torch.dtype) -> None:
    """A client may look its token up in top_logprobs: the two numbers are one computation."""
    x = _rows(12, dtype, seed=7)
    tokens = x.float().topk(3, dim=-1).indices[torch.arange(12), torch.arange(12) % 3]
    chosen, values, ids = cpu_kernels.logprobs(x, tokens, 5)
    for r in range(12):
        (at,) = (ids[r] == tokens[r]).nonzero()[0].tolist()
        assert chosen[r].item() == values[r, at].item()


def test_a_row_is_the_same_alone_and_in_a_batch() -> None:
    x = _rows(6, torch.bfloat16, seed=3)
    tokens = torch.arange(6) * 100
    batched = cpu_kernels.logprobs(x, tokens, 4)
    for r in range(6):
        alone = cpu_kernels.logprobs(x[r : r + 1].clone(), tokens[r : r + 1], 4)
        for got, want in zip(alone, batched, strict=True):
            assert torch.equal(got[0], want[r])


def test_strided_rows_and_other_dtypes_are_taken_as_float32() -> None:
    x = _rows(4, torch.float32)
    tokens = torch.tensor([0, 1, 2, 3])
    strided = x.t().contiguous().t()
    assert strided.stride(1) != 1
    for got, want in zip(
        cpu_kernels.logprobs(strided, tokens, 3), cpu_kernels.logprobs(x, tokens, 3), strict=True
    ):
        assert torch.equal(got, want)
    half, wide = cpu_kernels.logprobs(x.half(), tokens, 3), cpu_kernels.logprobs(x.half().float(), tokens, 3)
    for got, want in zip(half, wide, strict=True):
        assert torch.equal(got, want)


def test_rows_without_a_finite_peak_give_nan() -> None:
    x = torch.zeros(3, 50)
    x[0, 4] = math.nan
    x[1, 9] = math.inf
    x[2] = -math.inf
    chosen, values, ids = cpu_kernels.logprobs(x, torch.tensor([4, 9, 0]), 2)
    assert chosen.isnan().all() and values.isnan().all()
    assert ids.tolist() == [[0, 1]] * 3


def test_bad_inputs_are_refused() -> None:
    x = _rows(2, torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.logprobs(x, torch.tensor([0, VOCAB]), 1)
    with pytest.raises(RuntimeError, match="k <= V"):
        cpu_kernels.logprobs(x, torch.tensor([0, 1]), VOCAB + 1)


def test_the_sampler_reports_the_kernels_logprobs_for_bfloat16_logits() -> None:
    """The sampler hands the kernel the model's bfloat16 logits (no float32 copy) for greedy and
    sampled rows alike, and reports what torch's path reports for the same rows, up to the
    order of tied top values."""
    x = _rows(4, torch.bfloat16, seed=5)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=0.8, top_p=0.9, logprobs=5),
        SamplingParams(temperature=0.0),
    ]
    reqs = [Request(f"r{i}", [1], p, max_tokens=4) for i, p in enumerate(params)]
    cpu = torch.device("cpu")
    out = Sampler(cpu, cpu_kernels.sampler_kernels(cpu))(x, reqs)
    torch_lp = Sampler(cpu, SamplerKernels()).token_logprobs(x, torch.tensor(out.token_ids), 5)
    assert out.logprobs[3] is None
    for i, n in enumerate([3, 0, 5]):
        got, want = out.logprobs[i], torch_lp[i]
        assert got is not None and got.token_id == out.token_ids[i] == want.token_id
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top[:n]], abs=1e-5)
        row = x[i].float()
        assert [row[t].item() for t, _ in got.top] == [row[t].item() for t, _ in want.top[:n]]
    assert out.token_ids[0] == int(x[0].float().argmax())
