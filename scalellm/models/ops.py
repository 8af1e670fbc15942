"""The elementwise ops of a decoder layer, behind one interface.

``TorchOps`` composes torch ops and follows transformers bit for bit in float32 (the reference,
and the path on every device). ``scalellm.engine.cpu_kernels.CpuFusedOps`` does each op in one
pass over the row in C++ (one dispatch instead of ~6 for a norm and ~4 for rope or SiLU-and-mul:
at one decode stream a step is ~30 layers of such small ops). The loader picks one per model
(``scalellm.models.loader``) and logs it.

    residual stream:  h = embed;  per layer  x = norm(h) -> attn -> h += x -> norm(h) -> mlp -> h += x
    rms_norm(x, w, eps, residual):  residual += x (in place), then the norm of the residual
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class LayerOps(Protocol):
    name: str

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """RMSNorm of x [T, n], or, given residual [T, n], of residual + x (stored into residual)."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I] -> silu(gate) * up [T, I]."""
        ...

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        """Rotate x [T, H, D] in place with tables [T, 1, D] (see llama.RotaryEmbedding)."""
        ...


class TorchOps:
    name = "torch"

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """torch's fused rms_norm: in float32 bit for bit transformers' ``weight * (x * rsqrt(mean(x^2)
        + eps))``; in half types one rounding fewer than transformers (weight applied before the cast)."""
        if residual is not None:
            x = residual.add_(x)
        return F.rms_norm(x, weight.shape, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        """Each head's halves swapped, then the two products summed (transformers' arithmetic)."""
        half = x.shape[-1] // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        x.mul_(cos).add_(swapped.mul_(signed_sin))
