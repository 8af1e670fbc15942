"""models.ops_triton against TorchOps: on CPU through Triton's interpreter (TRITON_INTERPRET=1),
and compiled on CUDA under SCALELLM_TEST_DEVICE=cuda; skipped without triton."""

from __future__ import annotations

import pytest
import torch

from scalellm.engine.cpu_kernels import layer_ops
from scalellm.models import ops_triton
from scalellm.models.ops import TorchOps

pytestmark = pytest.mark.skipif(not ops_triton.AVAILABLE, reason="triton is not installed")

# float32 rounds once either way but sums in another order; bfloat16 and float16 round once here
# where torch rounds after each op: a last-bit difference (2^-8, 2^-11 relative) now and then.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest, engine_device: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """cpu: interpreted; cuda: compiled, only under SCALELLM_TEST_DEVICE=cuda."""
    if request.param == "cuda" and engine_device != "cuda":
        pytest.skip("runs under SCALELLM_TEST_DEVICE=cuda")
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return str(request.param)


def _randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [576, 4096])
def test_rms_norm_with_and_without_residual_equals_torch(device: str, dtype: torch.dtype, width: int) -> None:
    x = _randn(5, width, dtype=dtype, device=device, seed=0)
    weight = _randn(width, dtype=dtype, device=device, seed=1)
    tol = TOLERANCE[dtype]
    got, expected = ops_triton.TritonOps().rms_norm(x, weight, 1e-5), TorchOps().rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    res_got = _randn(5, width, dtype=dtype, device=device, seed=2)
    res_expected = res_got.clone()
    got = ops_triton.TritonOps().rms_norm(x, weight, 1e-5, res_got)
    expected = TorchOps().rms_norm(x, weight, 1e-5, res_expected)
    # The same one rounding of the sum; but Triton's interpreter truncates float32 to bfloat16
    # where CUDA and torch round to nearest even (one ulp apart in a quarter of the elements).
    exact = device == "cuda" or dtype != torch.bfloat16
    torch.testing.assert_close(res_got, res_expected, rtol=0 if exact else tol, atol=0 if exact else tol)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_over_several_tiles_equals_torch(device: str, dtype: torch.dtype) -> None:
    inter = ops_triton.SILU_BLOCK + 300  # two tiles, the second partial
    gate_up = _randn(3, 2 * inter, dtype=dtype, device=device, seed=3)
    got, expected = ops_triton.TritonOps().silu_mul(gate_up), TorchOps().silu_mul(gate_up)
    assert got.shape == (3, inter)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_rotates_q_and_k_in_place_in_the_fused_qkv_buffer(
    device: str, dtype: torch.dtype, head_dim: int
) -> None:
    """As the model calls it: q and k heads of the [T, Hq + 2 Hkv, D] buffer; v left alone."""
    hq, hkv, tokens = 4, 2, 3
    qkv = _randn(tokens, hq + 2 * hkv, head_dim, dtype=dtype, device=device, seed=4)
    angles = _randn(tokens, 1, head_dim, dtype=torch.float32, device=device, seed=5)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    got, expected = qkv.clone(), qkv.clone()
    ops_triton.TritonOps().rope_(got[:, : hq + hkv], cos, sin)
    TorchOps().rope_(expected[:, : hq + hkv], cos, sin)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(got[:, hq + hkv :], qkv[:, hq + hkv :], rtol=0, atol=0)
    assert not torch.equal(got[:, :hq], qkv[:, :hq])


def test_empty_steps_launch_nothing(device: str) -> None:
    ops = ops_triton.TritonOps()
    x = torch.empty(0, 8, device=device)
    assert ops.rms_norm(x, torch.ones(8, device=device), 1e-5).shape == (0, 8)
    assert ops.silu_mul(torch.empty(0, 16, device=device)).shape == (0, 8)
    ops.rope_(
        torch.empty(0, 2, 8, device=device),
        torch.empty(0, 1, 8, device=device),
        torch.empty(0, 1, 8, device=device),
    )


def test_the_loader_takes_triton_ops_on_cuda_in_half_types_only() -> None:
    """Selection only: no CUDA call is made in choosing. float32 on CUDA keeps the reference path."""
    assert isinstance(layer_ops(torch.device("cuda"), torch.bfloat16), ops_triton.TritonOps)
    assert isinstance(layer_ops(torch.device("cuda"), torch.float16), ops_triton.TritonOps)
    assert isinstance(layer_ops(torch.device("cuda"), torch.float32), TorchOps)
