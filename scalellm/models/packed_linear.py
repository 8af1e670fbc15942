"""Linear layers on CPU through oneDNN with the weights reordered once at load.

torch's ``F.linear`` on CPU goes to MKL's sgemm for float32. On AMD CPUs MKL takes a generic
path, and for bfloat16 at small batches torch's own GEMV; oneDNN (bundled with torch, the path
torch.compile's freezing uses) picks the CPU's best ISA (AVX-512, AVX512-BF16, AMX) and reads
weights laid out for it. Measured on the 2-core EPYC (docs/benchmarks.md): 2.4x on float32
gate/up at 64 tokens, 2x on bfloat16 at one token. Same arithmetic in the same precision,
accumulated in a different order (float32: errors of the same size as MKL's).

    nn.Linear.weight [out, in]  --reorder once-->  opaque oneDNN weight  --per call-->  x @ W^T (+ b)

Only CPU float32/bfloat16 models are packed; anything else keeps nn.Linear. ``PanelLinear``
(our kernel, ``csrc/linear_panels.cpp``: the weight in 16-column panels) takes these cases instead:
- a float32 model on any CPU with AVX2: with AVX-512, 16-lane panels, 1.5-2x oneDNN's speed from
  one to a few rows (a decode step at low concurrency: oneDNN's GEMV path streams the weights at
  ~19 GB/s and costs ~15 us a call) and level with it from 64 to 1024 rows (2-core Zen 4); on AVX2
  CPUs 0.71-0.91x oneDNN's time at every row count measured (1 to 1024 rows, 2-core AVX2 EPYC).
- a bfloat16 model on a CPU with AVX512-BF16 but not AMX: the weights in k pairs for vdpbf16ps,
  the same gains as float32's over oneDNN (AMX CPUs keep oneDNN, whose AMX kernels we do not
  match at many rows);
- a bfloat16 model on a CPU without bfloat16 arithmetic (no AVX512-BF16, no AMX: oneDNN has no
  bfloat16 kernels for it and torch's matmul takes a generic path): the weights stay bfloat16 and
  are widened in registers, float32 products and sums as a bfloat16 GEMM accumulates. On AVX2
  CPUs at every row count (0.38-1.05x oneDNN's float32 time from 1 to 1024 rows, 2-core AVX2 EPYC);
  on AVX-512 CPUs many rows go to a float32 copy through oneDNN instead (its AVX-512 kernels
  against our AVX2 one: not measured).
Each output is a sum over k in order, whatever the rows: a request's logits do not depend on what
it is batched with.
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


def avx2_is_widest() -> bool:
    """Whether torch dispatches this CPU's kernels at AVX2 (no AVX-512): where our panel kernel's
    8-lane vectors are as wide as oneDNN's."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def panels_isa(dtype: torch.dtype) -> str:
    """Which of our kernels a ``dtype`` weight's panels go through in this build: "avx512_bf16",
    "avx512", "avx2", "scalar", or "none" where our kernels cannot be built here."""
    from scalellm.engine import cpu_kernels  # here: cpu_kernels builds on the models package

    if not cpu_kernels.available():
        return "none"
    return str(torch.ops.scalellm_cpu.panels_isa(dtype))


def panels_take_every_row(dtype: torch.dtype) -> bool:
    """Whether PanelLinear runs every row count through our kernel (else a bfloat16 weight on an
    AVX-512 CPU whose kernel here is the 8-lane one also keeps a float32 copy for oneDNN)."""
    return dtype == torch.float32 or avx2_is_widest() or panels_isa(dtype) == "avx512_bf16"


def panels_apply(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this model's linear layers go through PanelLinear (the module docstring's cases),
    with our kernels built."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if panels_isa(dtype) in ("none", "scalar"):
        return False
    if dtype == torch.float32:
        return True
    if not packing_supported(device, dtype):
        return True  # no bfloat16 arithmetic for oneDNN here
    return panels_isa(dtype) == "avx512_bf16" and not torch.cpu._is_amx_tile_supported()


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


class PanelLinear(nn.Module):
    """``nn.Linear`` semantics through our panel kernel (inference only), in the weight's dtype.

    The weight packed once in 16-column panels (``torch.ops.scalellm_cpu.pack_panels``), through
    ``torch.ops.scalellm_cpu.linear_panels``, at every row count where ``panels_take_every_row``.
    Otherwise (a bfloat16 weight, an AVX-512 CPU, the 8-lane kernel) it also gets a float32 copy
    packed for oneDNN, which takes calls of more than ``max_kernel_rows`` rows (x widened, the
    output rounded back): both are float32 products and sums of the same bfloat16 values, one
    rounding of each output. The module keeps no reference to the original weight: a tied
    embedding keeps its own.
    """

    def __init__(self, linear: nn.Linear, max_kernel_rows: int = 16) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_kernel_rows: int = max_kernel_rows
        weight = linear.weight.detach().contiguous()
        self.panels: torch.Tensor = torch.ops.scalellm_cpu.pack_panels(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.packed: torch.Tensor | None = None
        self.bias32: torch.Tensor | None = None
        if not panels_take_every_row(weight.dtype) and packing_supported(weight.device, torch.float32):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.float())
            self.bias32 = None if self.bias is None else self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, x.dtype)

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """The same products and sums as ``forward``, in float32: each output as summed, not
        rounded to a bfloat16 weight's dtype (the logits: bfloat16 spaces them 0.125 apart
        between 16 and 32, so a near-tie there is a tie)."""
        return self._linear(x, torch.float32)

    def _linear(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.packed is not None and flat.shape[0] > self.max_kernel_rows:
            wide = torch.ops.mkldnn._linear_pointwise(flat.float(), self.packed, self.bias32, "none", [], "")
            out = wide.to(dtype)
        else:
            if flat.stride(-1) != 1:
                flat = flat.contiguous()
            out = flat.new_empty(flat.shape[0], self.out_features, dtype=dtype)
            torch.ops.scalellm_cpu.linear_panels(out, flat, self.panels, self.bias)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"max_kernel_rows={self.max_kernel_rows if self.packed is not None else 'all'}"
        )


def pack_linears(model: nn.Module, kind: type[PackedLinear] | type[PanelLinear] = PackedLinear) -> int:
    """Replace every nn.Linear in ``model`` with a ``kind`` (PackedLinear: oneDNN; PanelLinear: our
    panel kernel); returns how many were replaced. A weight shared with another module (tied
    embeddings) stays as it is for that module."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, kind(child))
                count += 1
    return count
