"""FlashAttention 2's paged kernels behind the attention interface, where flash-attn is installed
(the CUDA image builds it: docker/Dockerfile.cuda) and the cache's blocks are pages it can read.

flash-attn reads the engine's cache as it is. A layer's K (or V) view ``kv[:, 0]`` is
``[num_blocks, block_size, Hkv, D]`` with the block stride of the block-major cache, which
flash-attn takes as its paged layout ``(num_blocks, page_block_size, nheads_k, headdim)`` (any
strides but the last):

    decodes         flash_attn_with_kvcache(q [B, 1, Hq, D], k, v, cache_seqlens = context lens,
                    block_table = decode block tables)
    prefill chunks  flash_attn_varlen_func(q rows of the chunks, k, v, cu_seqlens_q (chunk
                    lengths), cu_seqlens_k (context + length), block_table = the chunks' tables,
                    causal: flash-attn aligns the mask bottom-right, so chunk row i sees keys
                    0 .. context + i, as the engine's causal mask does)

Every chunk's and decode's own K/V is in the cache before attention (``write_kv``, the Triton
kernel where triton imports, else indexing). flash-attn wants int32 tables and lengths:
``prepare`` converts them once a step (``FlashStep``), not once a layer.

flash-attn 2 reads paged K/V only in pages of a multiple of 256 tokens ("Paged KV cache block
size must be divisible by 256", through 2.8.3), so ``select_backend`` takes this backend only when
the engine's block_size is such a multiple (``--block-size 256``: coarser prefix caching and
allocation); at the default 16 the Triton kernels run and the startup log says why flash-attn was
passed over. FlashAttention 3 (Hopper, any page size; the module flash_attn_interface) is not
wired. This backend has not run on a GPU: its tests run it on CPU against TorchSDPA through a
stand-in for flash-attn that implements the documented semantics and checks the argument
contracts (dtypes, shapes, page size; tests/unit/test_attention_flash.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from scalellm.engine.attention import AttentionMetadata, TorchSDPA

AVAILABLE = importlib.util.find_spec("flash_attn") is not None
"""Whether flash-attn is importable (it is never on CPU installs)."""

PAGE_MULTIPLE = 256
"""flash-attn 2's paged kernels read pages of a multiple of this many tokens."""


def why_not(block_size: int, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why an engine with these blocks, model dtype and head size cannot use flash-attn (None:
    it can): flash-attn 2 computes in float16 and bfloat16 only, head sizes up to 256 in
    multiples of 8, paged K/V in pages of a multiple of 256 tokens."""
    if not AVAILABLE:
        return "flash-attn is not installed"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn computes in float16 and bfloat16 only, the model runs in {dtype}"
    if head_dim > 256 or head_dim % 8:
        return f"flash-attn takes head sizes up to 256 in multiples of 8, the model's is {head_dim}"
    if block_size % PAGE_MULTIPLE:
        return (
            f"flash-attn 2 reads paged KV in pages of a multiple of {PAGE_MULTIPLE} tokens and "
            f"block_size is {block_size} (--block-size {PAGE_MULTIPLE} selects it)"
        )
    return None


@dataclass(frozen=True)
class FlashStep:
    """What ``FlashAttnPaged.prepare`` adds to a step (AttentionMetadata.prepared)."""

    decode_tables: torch.Tensor | None
    """[B, max_blocks] int32."""
    decode_lens: torch.Tensor | None
    """[B] int32 context lengths (each decode's new token included)."""
    prefill_tables: torch.Tensor | None
    """[S, max_blocks] int32."""
    cu_seqlens_q: torch.Tensor | None
    """[S + 1] int32: chunk k's rows are [cu[k], cu[k + 1]) of the step's prefill rows."""
    cu_seqlens_k: torch.Tensor | None
    """[S + 1] int32 over the chunks' key counts (context + length)."""
    max_seqlen_q: int
    max_seqlen_k: int


class FlashAttnPaged:
    """Decodes and prefill chunks through flash-attn's paged kernels (see the module docstring)."""

    name = "flash-attn (paged KV: flash_attn_with_kvcache and flash_attn_varlen_func)"
    graph_safe = True  # no host syncs; it reads each row's cache_seqlens, not the table's width

    def __init__(self) -> None:
        import flash_attn  # here: a test may stand in for it

        self._flash: Any = flash_attn
        from scalellm.engine import attention_triton

        self._triton_write = attention_triton.write_kv if attention_triton.AVAILABLE else None
        self._indexed = TorchSDPA()  # its cache write (indexing) where the Triton one cannot run

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        tables = lens = chunk_tables = cu_q = cu_k = None
        max_q = max_k = 0
        if meta.decode_block_tables is not None and meta.decode_context_lens is not None:
            tables = meta.decode_block_tables.to(torch.int32)
            lens = meta.decode_context_lens.to(torch.int32)
        if meta.prefills:
            assert meta.prefill_bounds is not None and meta.prefill_tables is not None
            chunk_tables = meta.prefill_tables.to(torch.int32)
            lengths = meta.prefill_bounds[:, 1]
            cu_q = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            cu_k = F.pad((lengths + meta.prefill_bounds[:, 2]).cumsum(0), (1, 0)).to(torch.int32)
            max_q = max(s.end - s.start for s in meta.prefills)
            max_k = max(s.context_len + s.end - s.start for s in meta.prefills)
        step = FlashStep(tables, lens, chunk_tables, cu_q, cu_k, max_q, max_k)
        return dataclasses.replace(meta, prepared=step)

    def write_kv(self, kv: torch.Tensor, new_kv: torch.Tensor, meta: AttentionMetadata) -> None:
        if self._triton_write is not None and kv.is_cuda:
            self._triton_write(kv, new_kv, meta.slot_blocks, meta.slot_offsets)
        else:
            self._indexed.write_kv(kv, new_kv, meta)

    def decode(
        self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        step = meta.prepared
        assert isinstance(step, FlashStep) and step.decode_tables is not None
        out = self._flash.flash_attn_with_kvcache(
            q.unsqueeze(1),
            kv[:, 0],
            kv[:, 1],
            cache_seqlens=step.decode_lens,
            block_table=step.decode_tables,
            softmax_scale=scale,
            causal=True,
        )
        return out.squeeze(1)

    def prefill(
        self,
        q: torch.Tensor,
        new_kv: torch.Tensor,
        kv: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        if not meta.prefills:
            return
        step = meta.prepared
        assert isinstance(step, FlashStep) and step.prefill_tables is not None
        first, last = meta.prefills[0].start, meta.prefills[-1].end  # the chunks' rows are contiguous
        out[first:last] = self._flash.flash_attn_varlen_func(
            q[first:last],
            kv[:, 0],
            kv[:, 1],
            step.cu_seqlens_q,
            step.cu_seqlens_k,
            step.max_seqlen_q,
            step.max_seqlen_k,
            softmax_scale=scale,
            causal=True,
            block_table=step.prefill_tables,
        )
