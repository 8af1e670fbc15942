"""An int8 KV cache: the engine's block-major layout, each token's K or V head stored as int8
values followed by their float16 scale.

    one row (a token's K or V for one KV head), D = head_dim:
      | q[0] q[1] ... q[D-1]  (int8) | scale (float16, 2 bytes) |   D + 2 bytes, bfloat16: 2 D
      x ~= q * scale,  scale = max|x| / 127

    cache: int8 [num_blocks, num_layers, 2, block_size, num_kv_heads, D + 2]

A block is still one contiguous span, so the KV transfer sends runs of blocks as they are (its
layout reads dtype int8 and head_dim D + 2 off the tensor and refuses a peer whose cache differs).
Scales are per (token, head): a row is quantized once, when its token's K/V is written, and never
changes, so appending to a block never re-quantizes it.

On CPU the C++ kernels read and write this layout themselves (cpu_kernels.CpuPagedDecode, chosen
by attention.select_backend; csrc/paged_decode.cpp): writes quantize as quantize_rows does, the
same bytes; decodes dot q with a K row's int8 values and scale the sum, and scale each p by its V
row's scale; prefill tiles dequantize each tile as dequantize_rows does. Elsewhere (CUDA, or a CPU
where the kernels do not build) Int8KVSDPA below: reads dequantize what attention gathers: decodes
gather their blocks into a padded context (as attention.TorchSDPA does, at half the bytes) and
attend with one SDPA call; prefill chunks attend earlier context dequantized and their own K/V as
stored (quantized and dequantized again). Either way a token attends the same values whichever
chunk or step computes it: chunked prefill and preemption change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scalellm.engine.attention import AttentionMetadata, PrefillSpan, TorchSDPA, sdpa

QMAX = 127
SCALE_DTYPE = torch.float16
SCALE_BYTES = 2
_MIN_SCALE = torch.finfo(SCALE_DTYPE).tiny


@dataclass(frozen=True)
class KVCacheFormat:
    """What one element of the cache tensor is and how wide a (token, head) row is."""

    dtype: torch.dtype
    row_width: int

    @classmethod
    def resolve(cls, kv_cache_dtype: str, model_dtype: torch.dtype, head_dim: int) -> KVCacheFormat:
        """EngineConfig.kv_cache_dtype -> the cache format (auto: the model's dtype)."""
        if kv_cache_dtype == "int8":
            return cls(torch.int8, head_dim + SCALE_BYTES)
        if kv_cache_dtype == "auto":
            return cls(model_dtype, head_dim)
        raise ValueError(f"unsupported kv_cache_dtype {kv_cache_dtype!r}")

    @property
    def quantized(self) -> bool:
        return self.dtype == torch.int8

    @property
    def row_bytes(self) -> int:
        return self.row_width * self.dtype.itemsize


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (any float dtype) -> int8 rows [..., D + 2]: values, then the float16 scale."""
    head_dim = x.shape[-1]
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(_MIN_SCALE).to(SCALE_DTYPE)
    rows = torch.empty(*x.shape[:-1], head_dim + SCALE_BYTES, dtype=torch.int8, device=x.device)
    rows[..., :head_dim] = torch.round(xf / scale.float()).clamp_(-QMAX, QMAX)
    rows[..., head_dim:].view(SCALE_DTYPE).copy_(scale)
    return rows


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows [..., D + 2] -> [..., D] in ``dtype`` (the product taken in float32)."""
    head_dim = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., head_dim:].view(SCALE_DTYPE).float()
    return (rows[..., :head_dim].float() * scale).to(dtype)


class Int8KVSDPA:
    """The attention backend of an int8 cache: TorchSDPA's padded decode over dequantized blocks."""

    name = "torch-sdpa over an int8 KV cache (dequantized per step)"
    graph_safe = False

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        return TorchSDPA().prepare(meta, block_size)

    def write_kv(self, kv: torch.Tensor, new_kv: torch.Tensor, meta: AttentionMetadata) -> None:
        """new_kv [T, 2, Hkv, D] quantized into the step's slots: int8 rows [.., D + 2]."""
        kv[meta.slot_blocks, :, meta.slot_offsets] = quantize_rows(new_kv)

    def decode(
        self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """q [B, Hq, D]: each request's blocks gathered (K and V in one copy), dequantized, and
        attended with the query heads of a K/V head folded into the query length (see
        attention._decode)."""
        assert meta.decode_block_tables is not None and meta.decode_mask is not None
        batch, num_heads, head_dim = q.shape
        keys, values = self._context(kv, meta.decode_block_tables)  # [B, Hkv, L, D]
        grouped = q.reshape(batch, keys.shape[1], num_heads // keys.shape[1], head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=meta.decode_mask, scale=scale)
        return out.reshape(batch, num_heads, head_dim)

    def prefill(
        self,
        q: torch.Tensor,
        new_kv: torch.Tensor,
        kv: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        for span in meta.prefills:
            out[span.start : span.end] = self.prefill_span(q, new_kv, kv, span, scale)

    def prefill_span(
        self, q: torch.Tensor, new_kv: torch.Tensor, kv: torch.Tensor, span: PrefillSpan, scale: float
    ) -> torch.Tensor:
        """One prefill chunk -> [n, Hq, D]: earlier context and its own K/V dequantized (as stored)."""
        query = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        own = dequantize_rows(quantize_rows(new_kv[span.start : span.end]), self.dtype)
        chunk_k = own[:, 0].transpose(0, 1)  # [Hkv, n, D]
        chunk_v = own[:, 1].transpose(0, 1)
        if span.context_len == 0:
            return (
                sdpa(query, chunk_k.unsqueeze(0), chunk_v.unsqueeze(0), scale, causal=True)
                .squeeze(0)
                .transpose(0, 1)
            )
        n, ctx = span.end - span.start, span.context_len
        keys, values = self._context(kv, span.block_table.unsqueeze(0))
        keys = torch.cat((keys[0, :, :ctx], chunk_k), dim=1).unsqueeze(0)
        values = torch.cat((values[0, :, :ctx], chunk_v), dim=1).unsqueeze(0)
        rows = torch.arange(n, device=q.device).unsqueeze(1) + ctx
        mask = torch.arange(ctx + n, device=q.device).unsqueeze(0) <= rows  # [n, ctx + n]
        return sdpa(query, keys, values, scale, mask=mask).squeeze(0).transpose(0, 1)

    def _context(self, kv: torch.Tensor, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nb] block ids -> dequantized K and V, each [B, Hkv, nb * block_size, D]."""
        return self._gather(kv[:, 0], block_tables), self._gather(kv[:, 1], block_tables)

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        batch, nb = block_tables.shape
        _, bs, hkv, _ = cache.shape
        blocks = dequantize_rows(cache.index_select(0, block_tables.reshape(-1)), self.dtype)
        return blocks.view(batch, nb * bs, hkv, -1).transpose(1, 2)
