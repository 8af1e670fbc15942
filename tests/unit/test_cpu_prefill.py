"""The CPU prefill kernels (``paged_prefill`` in csrc/paged_decode.cpp: decode rows, or bfloat16
tiles where the CPU has AVX512-BF16) against torch's SDPA chunk by chunk and against the decode
kernel row by row, and the backend's split between the kernel and SDPA."""

from __future__ import annotations

import pytest
import torch

from scalellm.engine import cpu_kernels
from scalellm.engine.attention import AttentionMetadata, PrefillSpan, prefill_span

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ toolchain for the CPU kernel")

BLOCK = 16
DECODES = 3
"""Rows ahead of the chunks in q, as a step's decodes are: the kernel must leave them alone."""


class Step:
    """Prefill chunks (length, cached context) on random K/V in a paged cache, laid out as the
    engine lays out a step: q [DECODES + chunk rows, Hq, D], each chunk's K/V already in the cache."""

    def __init__(
        self,
        chunks: list[tuple[int, int]],
        dtype: torch.dtype,
        heads: int,
        kv_heads: int,
        head_dim: int,
        block: int = BLOCK,
    ) -> None:
        gen = torch.Generator().manual_seed(len(chunks) * 100 + head_dim + heads)
        need = sum(-(-(n + c) // block) for n, c in chunks)
        # slots no chunk has written hold NaN: a kernel that reads past a row's context shows it
        cache = torch.full((need + 5, 2, 2, block, kv_heads, head_dim), float("nan"), dtype=dtype)
        self.kv = cache[:, 1]  # strided, as the engine passes a layer's view
        perm = torch.randperm(need + 5, generator=gen).tolist()
        rows = DECODES + sum(n for n, _ in chunks)
        qkv = torch.randn(rows, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
        self.q = qkv[:, :heads]  # a view with the fused projection's row stride
        self.new_kv = torch.empty(rows, 2, kv_heads, head_dim, dtype=dtype)
        spans, tables, bounds, start = [], [], [], DECODES
        for n, context in chunks:
            ids = [perm.pop() for _ in range(-(-(n + context) // block))]
            for pos in range(context + n):  # the cached context, then the chunk's own K/V
                self.kv[ids[pos // block], :, pos % block] = torch.randn(2, kv_heads, head_dim, generator=gen)
            for i in range(n):
                pos = context + i
                self.new_kv[start + i] = self.kv[ids[pos // block], :, pos % block]
            spans.append(PrefillSpan(start, start + n, context, torch.tensor(ids)))
            tables.append(ids)
            bounds.append((start, n, context))
            start += n
        width = max(map(len, tables))
        self.spans = tuple(spans)
        self.tables = torch.tensor([ids + [0] * (width - len(ids)) for ids in tables])
        self.bounds = torch.tensor(bounds)
        self.scale = head_dim**-0.5

    def kernel(self, threads: int) -> torch.Tensor:
        out = torch.full_like(self.q, 7.0)
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            torch.ops.scalellm_cpu.paged_prefill(out, self.q, self.kv, self.tables, self.bounds, self.scale)
        finally:
            torch.set_num_threads(previous)
        return out

    def sdpa(self) -> torch.Tensor:
        out = torch.full_like(self.q, 7.0)
        for span in self.spans:
            out[span.start : span.end] = prefill_span(self.q, self.new_kv, self.kv, span, self.scale)
        return out

    def meta(self, backend: object) -> AttentionMetadata:
        return AttentionMetadata(
            slot_blocks=torch.zeros(0, dtype=torch.long),
            slot_offsets=torch.zeros(0, dtype=torch.long),
            num_decode_tokens=DECODES,
            decode_block_tables=None,
            decode_context_lens=None,
            prefills=self.spans,
            backend=backend,  # type: ignore[arg-type]
            prefill_bounds=self.bounds,
            prefill_tables=self.tables,
        )


# a fresh prompt; a chunk on a cached prefix, starting mid-block; one token on a full block; a
# prompt over many 8-row pieces and blocks
CHUNKS = [(37, 0), (20, 45), (1, 16), (130, 0)]
SHAPES = [(64, 9, 3), (128, 10, 2), (16, 6, 2)]  # SmolLM2's, 8B-like; a size only the scalar path takes


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), SHAPES)
@pytest.mark.parametrize("threads", [1, 8])
def test_prefill_kernel_equals_sdpa_chunk_by_chunk(
    dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int, threads: int
) -> None:
    step = Step(CHUNKS, dtype, heads, kv_heads, head_dim)
    got = step.kernel(threads)
    assert torch.equal(got[:DECODES], torch.full_like(got[:DECODES], 7.0))  # decode rows untouched
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, step.sdpa(), atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("block", [8, 32])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), [(64, 9, 3), (128, 8, 2)])
def test_prefill_kernel_with_other_block_sizes_and_odd_lengths(
    block: int, head_dim: int, heads: int, kv_heads: int
) -> None:
    """Blocks smaller and larger than a 16-token tile, chunks ending mid-tile on an odd token (the
    bfloat16 tiles pair tokens for P.V), and a context over many tiles."""
    for dtype in (torch.bfloat16, torch.float32):
        step = Step([(45, 0), (33, 301), (3, 7)], dtype, heads, kv_heads, head_dim, block)
        got = step.kernel(2)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, step.sdpa(), atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), SHAPES)
def test_a_prefilled_row_has_the_bits_of_the_same_row_decoded(
    dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int
) -> None:
    """The rows kernel: row i of a chunk on c cached tokens is a decode with context c + i + 1, the
    same sums in the same order, so the same bits. Either kernel: the same bits on 1 and on 8
    threads (other work items and orders). The tiles sum in another order (and round p to
    bfloat16 in bfloat16): SDPA's tolerance (above), not a decode's bits."""
    step = Step(CHUNKS, dtype, heads, kv_heads, head_dim)
    one, many = step.kernel(1), step.kernel(8)
    assert torch.equal(one, many)
    if torch.ops.scalellm_cpu.prefill_tiles(dtype == torch.bfloat16, head_dim):
        return
    for span, table in zip(step.spans, step.tables, strict=True):
        for i in range(span.end - span.start):
            row = slice(span.start + i, span.start + i + 1)
            alone = torch.empty_like(step.q[row])
            context = torch.tensor([span.context_len + i + 1])
            torch.ops.scalellm_cpu.paged_decode(alone, step.q[row], step.kv, table[None], context, step.scale)
            assert torch.equal(one[row], alone), (span, i)


@needs_kernel
def test_prefill_kernel_refuses_what_would_read_outside_the_cache() -> None:
    step = Step([(20, 45)], torch.float32, 9, 3, 64)
    out = torch.empty_like(step.q)
    call = torch.ops.scalellm_cpu.paged_prefill
    with pytest.raises(RuntimeError, match="rows out of range"):
        call(out, step.q, step.kv, step.tables, torch.tensor([[DECODES, 100, 45]]), step.scale)
    with pytest.raises(RuntimeError, match="too short"):
        call(out, step.q, step.kv, step.tables, torch.tensor([[DECODES, 20, 90]]), step.scale)
    bad = step.tables.clone()
    bad[0, 1] = step.kv.shape[0]
    with pytest.raises(RuntimeError, match="block id out of range"):
        call(out, step.q, step.kv, bad, step.bounds, step.scale)
    with pytest.raises(RuntimeError, match="bounds"):
        call(out, step.q, step.kv, step.tables, step.bounds[:, :2].contiguous(), step.scale)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_sends_short_chunks_to_the_kernel_and_long_ones_to_sdpa(dtype: torch.dtype) -> None:
    """Chunks whose context reaches past the backend's limit go to SDPA; the rest to the kernel in
    one call: the step's output equals SDPA's for every chunk either way."""
    limit = 100
    chunks = [(30, 0), (40, limit - 20), (9, 2)]  # the middle one attends limit + 20 tokens
    step = Step(chunks, dtype, 9, 3, 64)
    backend = cpu_kernels.CpuPagedDecode(limit)
    meta = backend.prepare(step.meta(backend), BLOCK)
    plan = meta.prepared
    assert isinstance(plan, cpu_kernels.CpuPrefillPlan)
    assert plan.bounds is not None and plan.bounds[:, 2].tolist() == [0, 2]
    assert plan.long_spans == (step.spans[1],)
    out = torch.full_like(step.q, 7.0)
    backend.prefill(step.q, step.new_kv, step.kv, meta, step.scale, out)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, step.sdpa(), atol=tol, rtol=tol)
    only_long = backend.prepare(Step([(40, limit)], dtype, 9, 3, 64).meta(backend), BLOCK).prepared
    assert isinstance(only_long, cpu_kernels.CpuPrefillPlan) and only_long.tables is None
    unlimited = cpu_kernels.CpuPagedDecode(None).prepare(step.meta(backend), BLOCK).prepared
    assert isinstance(unlimited, cpu_kernels.CpuPrefillPlan) and unlimited.long_spans == ()
    assert unlimited.tables is step.tables


@needs_kernel
def test_the_limit_follows_the_kernel_this_cpu_has() -> None:
    """The tiles (float32 on AVX-512, bfloat16 on AVX512-BF16) and the rows kernel each have their
    limits per dtype; other dtypes go to SDPA."""
    for dtype, bf16 in ((torch.float32, False), (torch.bfloat16, True)):
        tiles = torch.ops.scalellm_cpu.prefill_tiles(bf16, 64)
        assert tiles == torch.ops.scalellm_cpu.prefill_tiles(bf16, 128)
        assert not torch.ops.scalellm_cpu.prefill_tiles(bf16, 16)
        rows = cpu_kernels.ROWS_PREFILL_MAX_TOKENS[dtype]
        expected = cpu_kernels.TILES_PREFILL_MAX_TOKENS[dtype] if tiles else rows
        assert cpu_kernels.max_kernel_prefill_tokens(dtype, 64) == expected
        assert cpu_kernels.max_kernel_prefill_tokens(dtype, 16) == rows
    assert cpu_kernels.max_kernel_prefill_tokens(torch.float16, 64) == 0
