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
- ``w8a8`` (CPU, with our kernels: ``W8A8Kernel``, scalellm/engine/cpu_kernels.py): every linear
  layer, at every batch size (so a token's result never depends on what else is in the batch): the
  activations are quantized too, per row (token), and the product is int8 x int8 in int32, over a
  weight packed once at load (``pack_w8a8``; csrc/quant_ops.cpp's ``w8a8_linear``):

      x[t, g] ~= xq[t, g] * a[t, g]     a[t, g] = max_{i in g} |x[t, i]| / 127   (per call)
      y[t, o] = s[o] * sum_g (xq[t, g] . q[o, g]) * a[t, g]        (each group's dot exact in int32)

  with g the groups of ACT_GROUP consecutive input channels. The weight is packed as
  [N/16, K/4, 16, 4] (16 output channels x 4 consecutive input channels per 64 bytes), what both
  AVX512-VNNI (one register) and AMX int8 (one row of a B tile) read; the kernel takes AMX for
  tiles of 16 rows where the CPU and Linux allow it, else AVX512-VNNI, else AVX2, else scalar C++,
  and every path returns the same bits (the same exact group sums, the same float32 operations).
  This is W8A8 with dynamic per-token, per-group activation scales: more error than weight-only int8, faster at large batches. A few
  input channels of a layer's activations are far larger than the rest (down_proj's input most);
  one scale per token set by them rounds every other channel coarsely (+2.3% perplexity on the
  demo model, all layers), one per group of 64 only the outlier's group (-0.02%, measured,
  docs/benchmarks.md; SmoothQuant-style smoothing, tried first, did not help per token);
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

W8A8Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""(x [T, in], packed int8 weight (pack_w8a8), s [out], bias [out] or None) -> x @ (q * s)^T + bias
[T, out], with x quantized per row and group of ACT_GROUP channels to int8 (module docstring)."""

BLOCK_N = 16
"""Output channels side by side in pack_w8a8's layout (csrc/quant_ops.cpp's kBlockN)."""
K_QUAD = 4
"""Consecutive input channels of one output channel side by side in pack_w8a8's layout (kQuad)."""
ACT_GROUP = 64
"""Input channels per activation scale of the W8A8 kernel (csrc/quant_ops.cpp's kGroup)."""


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
    """int8 weights, float activations: ``(x @ q^T) * s`` (see the module docstring for the kernels)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, s = quantize_per_channel(linear.weight, linear.weight.dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, s, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if flat.is_cpu and flat.shape[0] <= GEMV_ROWS and flat.dtype in (torch.bfloat16, torch.float16):
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            out = F.linear(flat, self.qweight.to(flat.dtype)).mul_(self.scales)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*lead, self.out_features)


def pack_w8a8(q: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] -> [ceil(N / 16), ceil(K / 4), 16, 4]: for each block of 16 output channels,
    4 consecutive k of each of the 16 side by side (zeros pad N and K), so 64 bytes hold 16
    channels x 4 k: one AVX-512 register (vpdpbusd's operand) or one row of an AMX int8 B tile;
    csrc/quant_ops.cpp reads it."""
    n, k = q.shape
    n_pad, k_pad = -(-n // BLOCK_N) * BLOCK_N, -(-k // K_QUAD) * K_QUAD
    padded = torch.zeros(n_pad, k_pad, dtype=torch.int8, device=q.device)
    padded[:n, :k] = q
    return padded.view(n_pad // BLOCK_N, BLOCK_N, k_pad // K_QUAD, K_QUAD).permute(0, 2, 1, 3).contiguous()


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows ``rows`` of the int8 weight that ``pack_w8a8`` packed, [len(rows), in_features]."""
    picked = packed[rows // BLOCK_N, :, rows % BLOCK_N, :]  # [R, K/4, 4]
    return picked.reshape(rows.shape[0], -1)[:, :in_features]


class W8A8Linear(nn.Module):
    """int8 weights and int8 activations through ``kernel`` (see the module docstring)."""

    packed: torch.Tensor  # buffers, declared for the type checker
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        kernel: W8A8Kernel,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, scales.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).contiguous()
        out = self.kernel(flat, self.packed, self.scales, self.bias)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8"


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


class PackedEmbedding(nn.Module):
    """``nn.Embedding`` over the rows of a weight packed for W8A8 (shared with a tied lm_head)."""

    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.dim, self.dtype = dim, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = unpack_rows(self.packed, flat, self.dim).float() * self.scales[flat].float().unsqueeze(-1)
        return rows.to(self.dtype).view(*ids.shape, self.dim)


def quantize_w8a8(model: nn.Module, kernel: W8A8Kernel) -> int:
    """Every linear layer of ``model`` to W8A8Linear and every embedding to a PackedEmbedding; a
    weight tied between them is quantized and packed once. Returns how many weights were quantized."""
    packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cached(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if id(weight) not in packed:
            q, s = quantize_per_channel(weight, weight.dtype)
            packed[id(weight)] = pack_w8a8(q), s
        return packed[id(weight)]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else child.bias.detach().clone()
                layer = W8A8Linear(*cached(child.weight), bias, child.in_features, kernel)
                setattr(parent, name, layer)
            elif isinstance(child, nn.Embedding):
                embedding = PackedEmbedding(*cached(child.weight), child.embedding_dim, child.weight.dtype)
                setattr(parent, name, embedding)
    return len(packed)


def quantize_int8(model: nn.Module) -> int:
    """Every linear layer and embedding of ``model`` to weight-only int8 (see replace_weights)."""
    return replace_weights(model, lambda w: quantize_per_channel(w, w.dtype), Int8Linear)


def quantize_weights(
    model: nn.Module,
    quantization: str,
    w8a8_kernel: W8A8Kernel | None = None,
) -> int:
    """Quantize ``model`` in place to ``quantization`` (EngineConfig.quantization, not none);
    w8a8 runs on ``w8a8_kernel``."""
    if quantization == "int8":
        return quantize_int8(model)
    if quantization == "w8a8":
        if w8a8_kernel is None:
            raise ValueError(
                "quantization w8a8 needs the CPU int8 kernels (csrc/quant_ops.cpp), which did not build"
            )
        return quantize_w8a8(model, w8a8_kernel)
    if quantization == "fp8":
        from scalellm.models.quant_fp8 import quantize_fp8

        return quantize_fp8(model)
    raise ValueError(f"weight quantization {quantization!r} is not implemented")


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights take: parameters, int8 buffers and scales, and oneDNN-packed copies,
    each tensor counted once (rope tables, which are not weights, are left out; tensors may share
    a storage, huge_pages' arenas)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * module.packed.dtype.itemsize
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name in module._non_persistent_buffers_set:
                continue
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.nbytes
    return total
