"""Linear layers on CPU through oneDNN with the weights reordered once at load.

torch's ``F.linear`` on CPU goes to MKL's sgemm for float32. On AMD CPUs MKL takes a generic
path, and for bfloat16 at small batches torch's own GEMV; oneDNN (bundled with torch, the path
torch.compile's freezing uses) picks the CPU's best ISA (AVX-512, AVX512-BF16, AMX) and reads
weights laid out for it. Measured on the 2-core EPYC (docs/benchmarks.md): 2.4x on float32
gate/up at 64 tokens, 2x on bfloat16 at one token. Same arithmetic in the same precision,
accumulated in a different order (float32: errors of the same size as MKL's).

    nn.Linear.weight [out, in]  --reorder once-->  opaque oneDNN weight  --per call-->  x @ W^T (+ b)

Only CPU float32/bfloat16 models are packed; anything else keeps nn.Linear.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """``nn.Linear`` semantics over a oneDNN-reordered copy of the weight (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the engine's flattened tokens: no reshapes around the call
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in ``model`` with a PackedLinear; returns how many were packed.
    A weight shared with another module (tied embeddings) stays as it is for that module."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
