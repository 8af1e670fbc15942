"""fp8 (e4m3) linear layers through ``torch._scaled_mm``, for GPUs with fp8 matmuls (compute
capability 8.9+: Ada, Hopper, Blackwell). Weights are quantized at load, activations per call:

    weight  q[o, i] = W[o, i] / s_w[o],  s_w[o] = max_i |W[o, i]| / 448     (a scale per output channel)
    input   x_q[t, i] = x[t, i] / s_x[t], s_x[t] = max_i |x[t, i]| / 448     (a scale per token)
    y[t, o] = (x_q @ q^T)[t, o] * s_x[t] * s_w[o]      one _scaled_mm with row-wise scales

Layers whose dimensions are not multiples of 16 (what the fp8 matmul needs) keep their weights.
torch's CPU ``_scaled_mm`` computes the same thing (the unit tests use it), far too slowly to
serve: EngineConfig refuses fp8 off CUDA. Not yet run on a GPU in this project.
"""

from __future__ import annotations

import torch
from torch import nn

from scalellm.models.quant_linear import QuantLinear, replace_weights

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_ALIGN = 16


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> (fp8 [rows, cols], float32 scales [rows, 1]) with x ~= q * s."""
    xf = x.float()
    scales = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (xf / scales).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scales


class Fp8Linear(QuantLinear):
    """fp8 weights, and activations quantized per token on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, xs = quantize_fp8_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            xq, self.qweight.t(), scale_a=xs, scale_b=self.scales.view(1, -1), out_dtype=torch.bfloat16
        ).to(x.dtype)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*lead, self.out_features)


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scales = quantize_fp8_rows(weight)
    return q, scales.squeeze(1)


def quantize_fp8(model: nn.Module) -> int:
    """Linear layers (dimensions multiples of 16) and embeddings of ``model`` to fp8."""
    device = next(model.parameters()).device
    if device.type == "cuda" and not fp8_supported(device):
        raise ValueError(f"quantization fp8 needs compute capability 8.9+; {device} has less")
    return replace_weights(
        model,
        quantize_fp8_weight,
        Fp8Linear,
        skip=lambda linear: linear.in_features % _ALIGN != 0 or linear.out_features % _ALIGN != 0,
    )
