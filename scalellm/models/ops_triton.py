"""models.ops.LayerOps in Triton for CUDA in half types: one kernel per op instead of torch's 2-4.

A decode step of an 8B-shaped model on an H200 (docs/benchmarks.md) launched ~18 kernels a layer,
about half of them small elementwise ones (torch's RMSNorm after a separate residual add, four for
rope, two for SiLU-and-mul); inside a CUDA graph each still costs a few microseconds. Here:

    rms_norm   program per row:      r = x + residual (stored back, rounded), out = r * rstd * w
    silu_mul   program per (row, tile of I):  out = silu(gate) * up
    rope_      program per (row, head), in place:  x = x * cos + [x2, x1] * signed_sin

Each computes in float32 and rounds once, where torch's ops round after every op: in bfloat16 the
results differ from TorchOps' in the last bit now and then; float32 stays on TorchOps (loader's
``layer_ops``), the reference path that follows transformers bit for bit. Tested against TorchOps
on CPU under TRITON_INTERPRET=1 (tests/unit/test_ops_triton.py) and compiled on CUDA where a GPU
is (SCALELLM_TEST_DEVICE=cuda).
"""

from __future__ import annotations

import importlib.util

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None

if AVAILABLE:
    import triton
    import triton.language as tl

    from scalellm.models.triton_jit import FP_FUSION, Jitted, add_combine

    def _rms_norm_body(  # type: ignore[no-untyped-def]
        out_ptr, x_ptr, res_ptr, w_ptr, eps, n, stride_x, stride_r, stride_o,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            rounded = r.to(res_ptr.dtype.element_ty)  # what residual.add_(x) leaves behind
            tl.store(res_ptr + row * stride_r + cols, rounded, mask=mask)
            x = rounded.to(tl.float32)
        mean_square = tl.reduce(x * x, 0, add_combine) / n
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = x / tl.sqrt(mean_square + eps) * w
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    def _silu_mul_body(  # type: ignore[no-untyped-def]
        out_ptr, gate_up_ptr, inter, stride_g, stride_o, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * stride_g + inter + cols, mask=mask, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    def _rope_body(  # type: ignore[no-untyped-def]
        x_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_c, stride_s,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, BLOCK)
        mask = d < HEAD_DIM
        half = HEAD_DIM // 2
        swapped = tl.where(d < half, d + half, d - half)
        base = x_ptr + token * stride_xt + head * stride_xh
        x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
        xs = tl.load(base + swapped, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + token * stride_c + d, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + token * stride_s + d, mask=mask, other=0.0).to(tl.float32)
        tl.debug_barrier()  # every lane has read both halves before any lane writes
        tl.store(base + d, (x * cos + xs * sin).to(x_ptr.dtype.element_ty), mask=mask)

    _rms_norm = Jitted(_rms_norm_body)
    _silu_mul = Jitted(_silu_mul_body)
    _rope = Jitted(_rope_body)


SILU_BLOCK = 1024


class TritonOps:
    """LayerOps for CUDA tensors in bfloat16 or float16 (the loader's choice there); rows must be
    contiguous along their last dimension."""

    name = "triton (fused rms_norm with residual, silu_mul, rope)"

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows, n = x.shape
        assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
        out = torch.empty_like(x)
        if rows == 0:
            return out
        res = x if residual is None else residual
        _rms_norm()[(rows,)](
            out, x, res, weight, eps, n, x.stride(0), res.stride(0), out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n), enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        assert gate_up.stride(1) == 1
        out = gate_up.new_empty(rows, inter)
        if rows == 0:
            return out
        block = min(SILU_BLOCK, triton.next_power_of_2(inter))
        _silu_mul()[(rows, triton.cdiv(inter, block))](
            out, gate_up, inter, gate_up.stride(0), out.stride(0), BLOCK=block, enable_fp_fusion=FP_FUSION
        )
        return out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        tokens, heads, dim = x.shape
        if tokens == 0:
            return
        assert x.stride(2) == 1 and cos.stride(2) == 1 and signed_sin.stride(2) == 1
        _rope()[(tokens, heads)](
            x, cos, signed_sin, x.stride(0), x.stride(1), cos.stride(0), signed_sin.stride(0),
            HEAD_DIM=dim, BLOCK=triton.next_power_of_2(dim), enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
