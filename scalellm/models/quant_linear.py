"""int8 linear layers and embeddings, quantized at load from the checkpoint's weights.

Symmetric, one scale per output channel (per row of the weight), computed once at load:

    s[o] = max_i |W[o, i]| / 127            (rounded to the model's dtype first)
    q[o, i] = round(W[o, i] / s[o])          int8 in [-127, 127]
    y = x @ W^T  ~=  (x @ q^T) * s           (the scale factors out of every output column)

so the weight takes one byte per value plus one scale per row, half of bfloat16's bytes, and the
error of each weight is at most s[o] / 2. A tied embedding and lm_head share one int8 copy (a
per-row scale of the lm_head is a per-token scale of the embedding).

Kernels (measured in bench/quant_linear.py, docs/benchmarks.md):

- few rows (decode batches up to ``GEMV_ROWS``) in bfloat16/float16: ``torch._weight_int8pack_mm``,
  which streams the int8 weight once per row (a GEMV; its cost grows with the rows);
- ``w8a8`` (CPU, with our kernels: ``Int8Matmul``, scalellm/engine/cpu_kernels.py): the decoder's
  linear layers but WEIGHT_ONLY at every batch size (so a token's result never depends on what
  else is in the batch): the activations are quantized too, per row (token), and the product is
  int8 x int8 in int32 (``torch._int_mm``, VNNI where the CPU has it):

      x[t] ~= xq[t] * a[t]     a[t] = max_i |x[t, i]| / 127      (dynamic: computed per call)
      y[t, o] = (xq[t] . q[o]) * a[t] * s[o]                       (the dot product exact in int32)

  This is W8A8 (vLLM's "dynamic per-token" int8): more error than weight-only int8, faster at
  large batches (docs/benchmarks.md has both: per layer ~1.5x bfloat16's oneDNN layer at 64 rows
  and at one row on the 2-core EPYC, slower at 2-8 rows);
- otherwise (no kernels, float32 activations on a GPU, ...): q converted to the activation dtype
  (exact: int8 values are integers of every float type) and one matmul, the scales applied to the
  output columns.

The weight-only paths compute the same ``(x @ q^T) * s``, accumulated in a different order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.models.packed_linear import PackedLinear

QMAX = 127
GEMV_ROWS = 8
"""Up to this many rows the int8 GEMV kernel beats converting the weight (bench/quant_linear.py)."""

Int8Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""(x [T, in], q int8 [out, in], s [out], bias [out] or None) -> x @ (q * s)^T + bias [T, out],
with x quantized per row to int8 (see the module docstring)."""


def quantize_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q int8 [out, in], s [out] in ``scale_dtype``) with W ~= q * s[:, None].

    The scale is rounded to ``scale_dtype`` before q is computed, so q * s (as stored) is the
    nearest int8 grid point of every weight: the error is at most s / 2 whatever the dtype."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / QMAX).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = torch.round(w / scales.float().unsqueeze(1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight the int8 layer computes with, q * s, in ``dtype`` (for references and tests)."""
    return (q.float() * scales.float().unsqueeze(1)).to(dtype)


class QuantLinear(nn.Module):
    """``nn.Linear`` semantics over a quantized weight [out, in] with a scale per output channel
    (inference only); subclasses compute."""

    qweight: torch.Tensor  # buffers, declared for the type checker
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qweight.dtype}"


class Int8Linear(QuantLinear):
    """int8 weights: ``(x @ q^T) * s`` (see the module docstring for the kernels); ``int8_matmul``
    takes every batch when given."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        int8_matmul: Int8Matmul | None = None,
    ) -> None:
        super().__init__(qweight, scales, bias)
        self.int8_matmul = int8_matmul

    @classmethod
    def from_linear(cls, linear: nn.Linear, int8_matmul: Int8Matmul | None = None) -> Int8Linear:
        q, s = quantize_per_channel(linear.weight, linear.weight.dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, s, bias, int8_matmul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if self.int8_matmul is not None:  # every batch size: a token's result never depends on the batch
            out = self.int8_matmul(flat.contiguous(), self.qweight, self.scales, self.bias)
            return out.view(*lead, self.out_features)
        if flat.is_cpu and flat.shape[0] <= GEMV_ROWS and flat.dtype in (torch.bfloat16, torch.float16):
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            out = F.linear(flat, self.qweight.to(flat.dtype)).mul_(self.scales)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*lead, self.out_features)


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` over quantized rows (int8 or fp8) with a scale per row (the token's)."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qweight[ids].float() * self.scales[ids].float().unsqueeze(-1)).to(self.dtype)


Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LinearFactory = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], nn.Module]


def replace_weights(
    model: nn.Module,
    quantize: Quantizer,
    make_linear: LinearFactory,
    skip: Callable[[nn.Linear], bool] | None = None,
) -> int:
    """Replace every nn.Linear of ``model`` by ``make_linear(q, s, bias)`` and every nn.Embedding
    by a QuantEmbedding; a weight tied between them is quantized once and shared. Linear layers
    ``skip`` names keep their weights. Returns how many weights were quantized."""
    quantized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cached(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if id(weight) not in quantized:
            quantized[id(weight)] = quantize(weight)
        return quantized[id(weight)]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not (skip and skip(child)):
                bias = None if child.bias is None else child.bias.detach().clone()
                setattr(parent, name, make_linear(*cached(child.weight), bias))
            elif isinstance(child, nn.Embedding):
                setattr(parent, name, QuantEmbedding(*cached(child.weight), child.weight.dtype))
    return len(quantized)


WEIGHT_ONLY = ("down_proj", "lm_head")
"""Layers that stay weight-only under w8a8. down_proj: its input, silu(gate) * up, has the widest
outlier channels; quantizing it per token cost the most perplexity (docs/benchmarks.md). lm_head:
oneDNN's int8 GEMM lays its weight out anew on every call (28 MB for the demo model's vocabulary),
slower than the weight-only paths from 2 rows up (bench/quant_linear.py)."""


def quantize_int8(model: nn.Module, int8_matmul: Int8Matmul | None = None) -> int:
    """Every linear layer and embedding of ``model`` to int8 (see replace_weights); int8_matmul:
    the W8A8 kernel for the decoder's linear layers but WEIGHT_ONLY (None: weight-only int8)."""

    def make(q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return Int8Linear(q, s, bias, int8_matmul)

    count = replace_weights(model, lambda w: quantize_per_channel(w, w.dtype), make)
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear) and name.rsplit(".", 1)[-1] in WEIGHT_ONLY:
            module.int8_matmul = None
    return count


def quantize_weights(model: nn.Module, quantization: str, int8_matmul: Int8Matmul | None = None) -> int:
    """Quantize ``model`` in place to ``quantization`` (EngineConfig.quantization, not none)."""
    if quantization == "int8":
        return quantize_int8(model)
    if quantization == "w8a8":
        if int8_matmul is None:
            raise ValueError(
                "quantization w8a8 needs the CPU int8 kernels (csrc/quant_ops.cpp), which did not build"
            )
        return quantize_int8(model, int8_matmul)
    if quantization == "fp8":
        from scalellm.models.quant_fp8 import quantize_fp8

        return quantize_fp8(model)
    raise ValueError(f"weight quantization {quantization!r} is not implemented")


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights take: parameters, int8 buffers and scales, and oneDNN-packed copies,
    each storage counted once (rope tables, which are not weights, are left out)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * module.packed.dtype.itemsize
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name in module._non_persistent_buffers_set:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
