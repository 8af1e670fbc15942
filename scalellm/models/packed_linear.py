"""Linear layers on CPU through oneDNN with the weights reordered once at load.

torch's ``F.linear`` on CPU goes to MKL's sgemm for float32. On AMD CPUs MKL takes a generic
path, and for bfloat16 at small batches torch's own GEMV; oneDNN (bundled with torch, the path
torch.compile's freezing uses) picks the CPU's best ISA (AVX-512, AVX512-BF16, AMX) and reads
weights laid out for it. Measured on the 2-core EPYC (docs/benchmarks.md): 2.4x on float32
gate/up at 64 tokens, 2x on bfloat16 at one token. Same arithmetic in the same precision,
accumulated in a different order (float32: errors of the same size as MKL's).

    nn.Linear.weight [out, in]  --reorder once-->  opaque oneDNN weight  --per call-->  x @ W^T (+ b)

Only CPU float32/bfloat16 models are packed; anything else keeps nn.Linear. A bfloat16 model on a
CPU without bfloat16 arithmetic (no AVX512-BF16, no AMX: oneDNN has no bfloat16 kernels for it and
torch's matmul takes a generic path) gets ``Bf16Linear`` instead: for a few rows the weights stay
bfloat16, packed in panels that ``csrc/bf16_linear.cpp`` widens in registers; for many a float32
copy goes through oneDNN (float32 products and sums either way, as a bfloat16 GEMM
accumulates).
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


def bf16_kernel_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """A bfloat16 model on a CPU whose oneDNN has no bfloat16 kernels, with our kernels built."""
    if device.type != "cpu" or dtype != torch.bfloat16 or packing_supported(device, dtype):
        return False
    from scalellm.engine import cpu_kernels  # here: cpu_kernels builds on the models package

    return cpu_kernels.available()


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


class Bf16Linear(nn.Module):
    """``nn.Linear`` semantics for bfloat16 on CPUs without bfloat16 arithmetic (inference only).

    Up to ``max_kernel_rows`` rows (decode steps: bound by the bytes of weight streamed) the
    weight in bfloat16, packed once in 16-column panels (``torch.ops.scalellm_cpu.pack_bf16``),
    through ``torch.ops.scalellm_cpu.linear_bf16``; above (prefill, many decodes: bound by
    arithmetic, where oneDNN's float32 kernel is 1.5-2x ours from 32 rows on, docs/benchmarks.md)
    a float32 copy of the weight, packed for oneDNN, with x widened and the output rounded back.
    Both are float32 products and sums of the same bfloat16 values, one rounding of each output.
    The module keeps no reference to the original weight: a tied embedding keeps its own.
    """

    def __init__(self, linear: nn.Linear, max_kernel_rows: int = 16) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_kernel_rows = max_kernel_rows
        weight = linear.weight.detach().contiguous()
        self.panels = torch.ops.scalellm_cpu.pack_bf16(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.packed: torch.Tensor | None = None
        self.bias32: torch.Tensor | None = None
        if packing_supported(weight.device, torch.float32):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.float())
            self.bias32 = None if self.bias is None else self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.packed is not None and flat.shape[0] > self.max_kernel_rows:
            wide = torch.ops.mkldnn._linear_pointwise(flat.float(), self.packed, self.bias32, "none", [], "")
            out = wide.to(torch.bfloat16)
        else:
            if flat.stride(-1) != 1:
                flat = flat.contiguous()
            out = flat.new_empty(flat.shape[0], self.out_features)
            torch.ops.scalellm_cpu.linear_bf16(out, flat, self.panels, self.bias)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"max_kernel_rows={self.max_kernel_rows if self.packed is not None else 'all'}"
        )


def pack_linears(model: nn.Module, kind: type[PackedLinear] | type[Bf16Linear] = PackedLinear) -> int:
    """Replace every nn.Linear in ``model`` with a ``kind`` (PackedLinear: oneDNN; Bf16Linear: our
    bfloat16 kernel); returns how many were replaced. A weight shared with another module (tied
    embeddings) stays as it is for that module."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, kind(child))
                count += 1
    return count
