"""csrc/sample.cpp (cpu_kernels.sample) against a reference written out with a sort of the whole
vocabulary in float64: for each kept token, a uniform in the middle of its share of the CDF
draws that token; u = 0 draws the first kept one; cut and masked tokens are never drawn."""

from __future__ import annotations

import math

import pytest
import torch

from scalellm.engine import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ toolchain for the CPU kernels")

VOCAB = 3000


def _row(spread: float, seed: int, masked: int = 0) -> torch.Tensor:
    """Logits over VOCAB: peaked (spread large) or flat; the first ``masked`` of every other
    token -inf, as a grammar or a ban leaves them (token 0 among them)."""
    x = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * spread
    x[: 2 * masked : 2] = -math.inf
    return x


def _reference(x: torch.Tensor, t: float, k: int, p: float, min_p: float) -> tuple[list[int], torch.Tensor]:
    """The kept tokens in the order the draw walks them (a truncated row largest first, ties in
    vocabulary order; else vocabulary order) and their running sums."""
    x = x.double()
    e = ((x - x.max()) / t).exp()
    vals, order = e, torch.arange(len(e))
    has_k = 0 < k < len(e)
    if has_k or p < 1.0:
        vals, order = e.sort(descending=True, stable=True)
        norm = e.sum()
        if has_k:
            vals, order = vals[:k], order[:k]
            norm = vals.sum()
        if p < 1.0:
            keep = (vals.cumsum(0) - vals) < p * norm
            vals, order = vals[keep], order[keep]
    keep = (vals > 0) & (vals >= min_p * e.max())
    return order[keep].tolist(), vals[keep].cumsum(0)


def _draw(x: torch.Tensor, t: float, k: int, p: float, min_p: float, u: list[float]) -> list[int]:
    """The kernel's tokens for one row of logits repeated once per uniform (a batch)."""
    n = len(u)
    rows = x.unsqueeze(0).expand(n, -1).contiguous()
    return cpu_kernels.sample(rows, [t] * n, [k] * n, [p] * n, [min_p] * n, torch.tensor(u)).tolist()


CASES = [
    # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),  # the whole distribution, vocabulary order
    (0.7, 0, 1.0, 0.05),  # min-p alone
    (0.7, 0, 0.9, 0.0),
    (1.0, 0, 0.95, 0.0),
    (1.5, 0, 0.999, 0.0),  # deep thresholds
    (0.8, 50, 1.0, 0.0),
    (0.8, 1, 1.0, 0.0),
    (1.5, VOCAB - 1, 0.97, 0.0),  # top_k past every threshold's count: all candidates
    (1.0, 40, 0.5, 0.1),  # all three
    (0.8, 50, 1.0, 0.05),  # min-p within the top_k (peaked rows)
    (1.0, 0, 0.999, 0.02),  # min-p within the top-p
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("spread", "masked"), [(4.0, 0), (1.0, 0), (0.1, 0), (2.0, 1000)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "t{}-k{}-p{}-m{}".format(*c))
def test_draws_invert_the_kept_tokens_cdf(
    dtype: torch.dtype, spread: float, masked: int, case: tuple[float, int, float, float]
) -> None:
    x = _row(spread, seed=int(spread * 10) + masked, masked=masked).to(dtype)
    order, cdf = _reference(x.float(), *case)
    mass = float(cdf[-1])
    # a kept token's middle (skipping shares too thin to place a uniform in, float32 against
    # float64), 200 of them at most, spread over the kept ones
    lo = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf[:-1]])
    picks = [j for j in range(len(order)) if float(cdf[j] - lo[j]) > 1e-4 * mass]
    picks = picks[:: max(1, len(picks) // 200)]
    u = [0.0] + [float(lo[j] + cdf[j]) / 2 / mass for j in picks]
    got = _draw(x, *case, u)
    assert got == [order[0]] + [order[j] for j in picks]
    kept = set(order)
    cut = {i for i in range(VOCAB) if i not in kept}
    assert not cut & set(_draw(x, *case, torch.rand(500).tolist()))


def test_top_k_past_the_unmasked_tokens_draws_none_of_the_masked() -> None:
    """A top_k wider than the tokens left unmasked: the candidates reach the masked ones (e = 0),
    which are never drawn, even by the last uniform below 1."""
    x = _row(1.0, seed=3, masked=1400)
    order, _ = _reference(x, 1.0, VOCAB - 10, 1.0, 0.0)
    assert len(order) == VOCAB - 1400
    got = _draw(x, 1.0, VOCAB - 10, 1.0, 0.0, [0.0, 1.0 - 2.0**-24, *torch.rand(300).tolist()])
    assert set(got) <= set(order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_a_finite_peak_take_argmax_index(dtype: torch.dtype) -> None:
    """A NaN (a broken model), +inf, or every token masked: argmax's index, not a crash."""
    x = torch.zeros(3, 40)
    x[0, 5] = math.nan
    x[1, 7] = math.inf
    x[2] = -math.inf
    out = cpu_kernels.sample(x.to(dtype), [1.0] * 3, [0] * 3, [0.9] * 3, [0.0] * 3, torch.rand(3))
    assert out.tolist() == [5, 7, 0]


def test_rows_are_independent_of_the_batch() -> None:
    """Each row's token depends on its own logits, parameters and uniform: a batch of mixed rows
    draws what each row draws alone."""
    rows = torch.stack([_row(s, seed=i) for i, s in enumerate((4.0, 1.0, 0.1, 2.0))])
    params = [(1.0, 0, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (0.8, 50, 1.0, 0.05), (1.0, 40, 0.5, 0.1)]
    u = torch.rand(4)
    batch = cpu_kernels.sample(rows, *(list(c) for c in zip(*params, strict=True)), u).tolist()  # type: ignore[arg-type]
    assert batch == [_draw(rows[i], *params[i], [float(u[i])])[0] for i in range(4)]


def test_other_dtypes_and_strided_rows_draw_as_float32_rows() -> None:
    """float16 logits are widened first, columns a stride apart copied: the same tokens as the
    float32 rows for the same uniforms."""
    rows = torch.stack([_row(2.0, seed=i) for i in range(3)]).half()
    u = torch.rand(3)
    args = ([0.8] * 3, [0, 20, 0], [0.9, 1.0, 1.0], [0.0, 0.0, 0.1])
    want = cpu_kernels.sample(rows.float(), *args, u).tolist()
    assert cpu_kernels.sample(rows, *args, u).tolist() == want
    strided = torch.zeros(3, VOCAB, 2).half()
    strided[..., 0] = rows
    assert cpu_kernels.sample(strided[..., 0], *args, u).tolist() == want


def test_bad_parameters_are_refused() -> None:
    x = torch.zeros(1, 10)
    for t, p, u in ((0.0, 1.0, 0.5), (1.0, 0.0, 0.5), (1.0, 1.0, 1.0)):
        with pytest.raises(RuntimeError, match="temperature > 0"):
            cpu_kernels.sample(x, [t], [0], [p], [0.0], torch.tensor([u]))
