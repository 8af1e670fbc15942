"""Attention over the paged KV cache, behind one interface.

The cache of one layer is the strided view ``kv[num_blocks, 2, block_size, num_kv_heads,
head_dim]`` of the block-major engine cache (see model_runner). A step's tokens arrive
flattened, single-token queries (decodes) first, then prefill chunks:

    tokens   [d0 d1 d2 | p0 p0 p0 p0 | p1 p1]     num_decode_tokens = 3
              decodes    chunk of A    chunk of B

The model calls ``paged_attention`` and knows nothing else: it writes the step's K/V into the
cache and hands decodes and prefill chunks to the step's backend (``AttentionMetadata.backend``).
A backend is chosen once per engine (``select_backend``) and logged at startup; a GPU backend
(a paged kernel reading the block table itself, CUDA graphs) plugs in here without touching the
model code.

Backends:
- ``TorchSDPA`` (every device): each decode's blocks are gathered into a padded [B, L] context
  and attended with one masked SDPA call, the query heads that share a K/V head folded into the
  query length (so grouped-query K/V is never repeated; see _decode). Prefill chunks attend one
  request at a time (``prefill_each_span``).
- ``CpuPagedDecode`` (CPU, where its C++ kernel builds; scalellm/engine/cpu_kernels.py): decodes
  read K/V straight from their blocks, no gathered copy; so do a step's prefill chunks, every one
  in one call, up to a length where SDPA's kernel is as fast (bfloat16 on AVX512-BF16: any
  length; ``max_kernel_prefill_tokens``), longer ones as TorchSDPA.
- ``TritonPagedDecode`` (CUDA, where triton imports; scalellm/engine/attention_triton.py): the
  same for GPUs, one Triton program per (sequence, K/V head), and every prefill chunk of a step
  in one varlen launch that reads its context from the blocks; ``SCALELLM_ATTENTION_TORCH=1``
  keeps TorchSDPA there instead.
- ``FlashAttnPaged`` (CUDA, where flash-attn is installed and block_size is a multiple of 256:
  flash-attn 2's page size; scalellm/engine/attention_flash.py): flash-attn's paged decode and
  varlen prefill kernels over the same cache.
- ``kv_quant.Int8KVSDPA`` (an int8 cache where the C++ kernels do not build, and on CUDA):
  TorchSDPA's way, dequantizing what it reads. On CPU an int8 cache takes ``CpuPagedDecode``,
  whose kernels read int8 rows and quantize what they write.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillSpan:
    start: int
    """Offset of the chunk in the flattened tokens."""
    end: int
    context_len: int
    """Tokens already in the cache before this chunk."""
    block_table: torch.Tensor
    """Block ids covering context_len + chunk length, on the cache's device."""


@dataclass(frozen=True)
class AttentionMetadata:
    slot_blocks: torch.Tensor
    """[T] block id of each new token's cache slot."""
    slot_offsets: torch.Tensor
    """[T] its offset inside the block."""
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None
    """[B, max_blocks] block ids of each decode, padded with 0."""
    decode_context_lens: torch.Tensor | None
    """[B] tokens each decode attends to (its own new one included)."""
    prefills: tuple[PrefillSpan, ...]
    backend: AttentionBackend
    decode_mask: torch.Tensor | None = None
    """[B, 1, 1, max_blocks * block_size]: True where the slot holds context (TorchSDPA only)."""
    prefill_bounds: torch.Tensor | None = None
    """[S, 3] the ``prefills`` as rows (start, length, context_len) on the device, for a backend
    that runs every chunk in one kernel (None when the step has no prefill chunk)."""
    prefill_tables: torch.Tensor | None = None
    """[S, max_blocks] each chunk's block table (its ``block_table``, padded with 0), on the device."""
    prepared: object | None = None
    """What the backend's ``prepare`` added for its own kernels, read by that backend only
    (attention_flash.FlashStep)."""

    @classmethod
    def decodes(
        cls,
        slot_blocks: torch.Tensor,
        slot_offsets: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        backend: AttentionBackend,
    ) -> AttentionMetadata:
        """A step of decodes only, one new token per row of ``block_tables``."""
        return cls(slot_blocks, slot_offsets, block_tables.shape[0], block_tables, context_lens, (), backend)


class AttentionBackend(Protocol):
    name: str
    graph_safe: bool
    """Whether its decodes may run bucketed on static buffers and be captured in a CUDA graph
    (engine/cuda_graphs.py): no host syncs, shapes fixed by the bucket, and a cost that does not
    grow with the static block table's width (only each row's context length is read)."""

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        """Once per step: add what this backend needs to the step's metadata."""
        ...

    def write_kv(self, kv: torch.Tensor, new_kv: torch.Tensor, meta: AttentionMetadata) -> None:
        """new_kv [T, 2, Hkv, D] into the step's slots of the layer's cache."""
        ...

    def decode(
        self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """q [B, Hq, D] of the step's decodes -> [B, Hq, D]; their K/V is already in ``kv``."""
        ...

    def prefill(
        self,
        q: torch.Tensor,
        new_kv: torch.Tensor,
        kv: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """The step's prefill chunks (``meta.prefills``): rows [span.start, span.end) of q [T, Hq,
        D] attend their context and, causally, their own chunk, into the same rows of out [T,
        Hq, D]. new_kv [T, 2, Hkv, D] is the step's new K/V, already written into ``kv``."""
        ...


def paged_attention(
    q: torch.Tensor, new_kv: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, Hq, D] and new_kv [T, 2, Hkv, D] (rope applied); writes new_kv into the cache and
    returns the attention output [T, Hq * D]."""
    num_tokens, num_heads, head_dim = q.shape
    meta.backend.write_kv(kv, new_kv, meta)
    nd = meta.num_decode_tokens
    if nd == num_tokens:
        return meta.backend.decode(q, kv, meta, scale).reshape(num_tokens, num_heads * head_dim)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = meta.backend.decode(q[:nd], kv, meta, scale)
    meta.backend.prefill(q, new_kv, kv, meta, scale, out)
    return out.view(num_tokens, num_heads * head_dim)


def prefill_each_span(
    q: torch.Tensor,
    new_kv: torch.Tensor,
    kv: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """AttentionBackend.prefill one chunk at a time through torch's SDPA (``prefill_span``)."""
    for span in meta.prefills:
        out[span.start : span.end] = prefill_span(q, new_kv, kv, span, scale)


class TorchSDPA:
    """Gather each decode's blocks into a padded context; torch's SDPA does the rest."""

    name = "torch-sdpa"
    graph_safe = False  # gathers every column of the block table: padded to max_model_len there

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        if meta.decode_block_tables is None or meta.decode_context_lens is None:
            return meta
        width = meta.decode_block_tables.shape[1] * block_size
        slots = torch.arange(width, device=meta.decode_block_tables.device)
        mask = (slots.unsqueeze(0) < meta.decode_context_lens.unsqueeze(1))[:, None, None, :]
        return dataclasses.replace(meta, decode_mask=mask)

    def write_kv(self, kv: torch.Tensor, new_kv: torch.Tensor, meta: AttentionMetadata) -> None:
        kv[meta.slot_blocks, :, meta.slot_offsets] = new_kv

    def decode(
        self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        assert meta.decode_block_tables is not None and meta.decode_mask is not None
        return _decode(q, kv[:, 0], kv[:, 1], meta.decode_block_tables, meta.decode_mask, scale)

    prefill = staticmethod(prefill_each_span)


FORCE_TORCH_ENV = "SCALELLM_ATTENTION_TORCH"
"""Set to 1 to keep TorchSDPA on CUDA even where the Triton kernel could run (A/B runs, a
suspected kernel fault)."""


def select_backend(
    device: torch.device, *, block_size: int, dtype: torch.dtype, head_dim: int, int8_kv: bool = False
) -> AttentionBackend:
    """The fastest backend that works here for a cache of ``block_size``-token blocks (int8
    rows with ``int8_kv``, engine/kv_quant.py) and a model computing in ``dtype``; the choice is
    logged. On CPU: the C++ kernels where they build. On CUDA: flash-attn's paged kernels where
    flash-attn is installed and takes them (attention_flash.why_not), else the Triton kernels
    where triton imports, else TorchSDPA. An int8 cache off those C++ kernels: Int8KVSDPA."""
    from scalellm.engine.kv_quant import Int8KVSDPA  # here: kv_quant builds on this module

    backend: AttentionBackend = Int8KVSDPA(dtype) if int8_kv else TorchSDPA()
    if device.type == "cpu":
        from scalellm.engine import cpu_kernels

        if cpu_kernels.available():
            longest = cpu_kernels.max_kernel_prefill_tokens(dtype, head_dim)
            backend = (
                cpu_kernels.CpuPagedDecode(longest, Int8KVSDPA(dtype).prefill_span)
                if int8_kv
                else cpu_kernels.CpuPagedDecode(longest)
            )
    elif device.type == "cuda" and not int8_kv and os.environ.get(FORCE_TORCH_ENV, "0") != "1":
        from scalellm.engine import attention_flash, attention_triton  # here: they build on this module

        passed_over = attention_flash.why_not(block_size, dtype, head_dim)
        if passed_over is None:
            backend = attention_flash.FlashAttnPaged()
        elif attention_triton.AVAILABLE:
            backend = attention_triton.TritonPagedDecode()
        if passed_over is not None and attention_flash.AVAILABLE:
            log.info("flash-attn is installed but not used: %s", passed_over)
    log.info("attention backend: %s", backend.name)
    return backend


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[..., max_blocks] block ids -> [..., Hkv, max_blocks * block_size, D].

    index_select copies whole blocks (each is contiguous); plain advanced indexing is ~3x slower."""
    *lead, nb = block_table.shape
    _, bs, hkv, d = cache.shape
    blocks = cache.index_select(0, block_table.reshape(-1))
    return blocks.view(*lead, nb * bs, hkv, d).transpose(-3, -2)


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per request, so the query heads that share a K/V head can sit in the query
    length dimension instead: q [B, Hq, D] -> [B, Hkv, G, D], G = Hq / Hkv (heads j*G..j*G+G-1
    read K/V head j, as in transformers' repeat_kv). Every SDPA kernel then sees equal head counts
    and the K/V context is read once, never repeated; the mask [B, 1, 1, L] covers all G rows.
    """
    keys = _gather(k_cache, block_tables)  # [B, Hkv, L, D]
    values = _gather(v_cache, block_tables)
    batch, num_heads, head_dim = q.shape
    grouped = q.reshape(batch, keys.shape[1], num_heads // keys.shape[1], head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def prefill_span(
    q: torch.Tensor, new_kv: torch.Tensor, kv: torch.Tensor, span: PrefillSpan, scale: float
) -> torch.Tensor:
    """One chunk's attention through torch's SDPA: rows [span.start, span.end) of q -> [n, Hq, D]."""
    n = span.end - span.start
    query = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    if span.context_len == 0:
        keys = new_kv[span.start : span.end, 0].transpose(0, 1).unsqueeze(0)
        values = new_kv[span.start : span.end, 1].transpose(0, 1).unsqueeze(0)
        out = sdpa(query, keys, values, scale, causal=True)
    else:
        total = span.context_len + n
        keys = _gather(kv[:, 0], span.block_table)[:, :total].unsqueeze(0)
        values = _gather(kv[:, 1], span.block_table)[:, :total].unsqueeze(0)
        rows = torch.arange(n, device=q.device).unsqueeze(1) + span.context_len
        mask = torch.arange(total, device=q.device).unsqueeze(0) <= rows  # [n, total]
        out = sdpa(query, keys, values, scale, mask=mask)
    return out.squeeze(0).transpose(0, 1)  # [n, Hq, D]


def sdpa(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    expand_heads: bool | None = None,
) -> torch.Tensor:
    """SDPA over [B, H, L, D] with fewer K/V heads than query heads (grouped-query attention), for
    prefill chunks (a causal chunk cannot fold its heads into the query length the way _decode does).

    On CUDA (expand_heads None) the K/V heads are repeated up to the query heads first: torch's
    flash and memory-efficient kernels only take equal head counts, and grouped heads otherwise
    land on cuDNN attention, which builds a plan for every new shape. The engine's shapes change
    with every step (batch, context width, prompt length), so on an H100 that cost 3-4x the run
    time of a fresh workload (docs/benchmarks.md). On CPU, grouped heads go in as they are.
    """
    groups = query.shape[-3] // keys.shape[-3]
    if expand_heads is None:
        expand_heads = query.is_cuda
    if groups > 1 and expand_heads:
        keys = keys.repeat_interleave(groups, dim=-3)
        values = values.repeat_interleave(groups, dim=-3)
        groups = 1
    return F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=groups > 1
    )
