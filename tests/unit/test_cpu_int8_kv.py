"""An int8 KV cache through the CPU kernels (csrc/paged_decode.cpp): cache writes that quantize as
kv_quant.quantize_rows does (the same bytes), decodes and prefill chunks that read the int8 rows
(within float32 rounding of attention over the dequantized cache, the same bits on any threads and
batch), and the backend that takes them on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalellm.engine import cpu_kernels
from scalellm.engine.attention import AttentionMetadata, PrefillSpan, TorchSDPA, _decode, select_backend
from scalellm.engine.kv_quant import Int8KVSDPA, dequantize_rows, quantize_rows

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ toolchain for the CPU kernel")

SHAPES = [(64, 9, 3), (128, 10, 2), (16, 6, 2)]  # SmolLM2's heads, 8B-like, a size only the scalar path takes
BLOCK = 16


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def _with_threads(threads: int, run: object) -> torch.Tensor:
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return run()  # type: ignore[operator,no-any-return]
    finally:
        torch.set_num_threads(previous)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 16])
def test_kv_write_quantizes_each_row_as_quantize_rows(dtype: torch.dtype, head_dim: int) -> None:
    """The C++ write of a step's K/V into an int8 cache: each (token, head) row's values and
    float16 scale are quantize_rows' bytes (a zero row: the smallest scale), in the right slots of
    the strided layer view, nothing else touched."""
    gen = torch.Generator().manual_seed(head_dim)
    cache = torch.randint(-127, 128, (12, 3, 2, 4, 3, head_dim + 2), dtype=torch.int8, generator=gen)
    qkv = (torch.randn(5, 9 + 2 * 3, head_dim, generator=gen) * 5).to(dtype)
    qkv[2, 9:] = 0.0
    new_kv = qkv[:, 9:].unflatten(1, (2, 3))  # [T, 2, Hkv, D], a view as the model passes it
    meta = AttentionMetadata(
        torch.tensor([4, 4, 0, 11, 7]), torch.tensor([0, 3, 2, 1, 3]), 0, None, None, (), TorchSDPA()
    )
    expected = cache.clone()
    Int8KVSDPA(dtype).write_kv(expected[:, 1], new_kv, meta)
    backend = select_backend(torch.device("cpu"), block_size=4, dtype=dtype, head_dim=head_dim, int8_kv=True)
    backend.write_kv(cache[:, 1], new_kv, meta)
    assert torch.equal(cache, expected)
    with pytest.raises(RuntimeError, match="dtype mismatch"):  # an int8 cache takes float rows only
        torch.ops.scalellm_cpu.write_kv(cache[:, 1], new_kv.half(), meta.slot_blocks, meta.slot_offsets)


def _int8_layer(blocks: int, kv_heads: int, head_dim: int, gen: torch.Generator) -> torch.Tensor:
    """A layer's int8 cache [blocks, 2, BLOCK, Hkv, D + 2] (the strided view of a 2-layer cache)."""
    return quantize_rows(torch.randn(blocks, 2, 2, BLOCK, kv_heads, head_dim, generator=gen) * 2)[:, 1]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), SHAPES)
def test_int8_decode_equals_attention_over_the_dequantized_cache(
    dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int
) -> None:
    """Decodes straight from the int8 rows: a long decode and its drafts over several partitions
    (2302, 2303, 2600 tokens), a row of one partition (1279), short rows; against SDPA over the
    dequantized cache in float32, and each row's bits the same alone, in the batch, on 1 and 8
    threads."""
    gen = torch.Generator().manual_seed(head_dim + heads)
    width = 170  # blocks a table: 2720 tokens
    long_rows, short = [2302, 2303, 2600], [1, 17, 200]
    short_blocks = [-(-n // BLOCK) for n in short]
    kv = _int8_layer(2 * width + sum(short_blocks), kv_heads, head_dim, gen)
    perm = torch.randperm(len(kv), generator=gen).split([width, width, *short_blocks])
    tables = [perm[0]] * len(long_rows) + [perm[1]] + [F.pad(ids, (0, width - len(ids))) for ids in perm[2:]]
    tables_t = torch.stack(tables).contiguous()
    context = torch.tensor([*long_rows, 1279, *short])
    q = torch.randn(len(context), heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5

    def decode(rows: slice) -> torch.Tensor:
        out = torch.empty_like(q[rows])
        torch.ops.scalellm_cpu.paged_decode(out, q[rows], kv, tables_t[rows], context[rows], scale)
        return out

    batch = _with_threads(1, lambda: decode(slice(None)))
    assert torch.equal(batch, _with_threads(8, lambda: decode(slice(None))))
    alone = torch.cat([_with_threads(8, lambda r=r: decode(slice(r, r + 1))) for r in range(len(context))])
    assert torch.equal(batch, alone)
    reference = dequantize_rows(kv, torch.float32)
    mask = (torch.arange(width * BLOCK).unsqueeze(0) < context.unsqueeze(1))[:, None, None, :]
    expected = _decode(q.float(), reference[:, 0], reference[:, 1], tables_t, mask, scale)
    tol = _tolerance(dtype)
    torch.testing.assert_close(batch.float(), expected, atol=tol, rtol=tol)


# a fresh prompt; a chunk on a cached prefix, starting mid-block; one token on a full block; a
# prompt over many pieces and tiles; a chunk on a long context
CHUNKS = [(37, 0), (20, 45), (1, 16), (130, 0), (33, 301)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), SHAPES)
def test_int8_prefill_chunks_equal_sdpa_over_the_dequantized_cache(
    dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int
) -> None:
    """Prefill chunks through the kernels (tiles that dequantize each tile where the CPU has them,
    else the decode rows) over an int8 cache whose chunks' own K/V the C++ write quantized: equal
    to Int8KVSDPA's chunk attention (context and chunk dequantized, SDPA) within the dtype's
    tolerance, the same bits on 1 and 8 threads. Slots no chunk wrote have a NaN scale: reading
    past a context shows."""
    gen = torch.Generator().manual_seed(head_dim * 3 + heads)
    need = sum(-(-(n + c) // BLOCK) for n, c in CHUNKS)
    kv = _int8_layer(need + 3, kv_heads, head_dim, gen)
    kv[..., head_dim:].view(torch.float16).fill_(float("nan"))
    perm = torch.randperm(len(kv), generator=gen).tolist()
    rows = sum(n for n, _ in CHUNKS)
    q = torch.randn(rows, heads, head_dim, generator=gen).to(dtype)
    new_kv = torch.randn(rows, 2, kv_heads, head_dim, generator=gen).to(dtype)
    spans, tables, bounds, slots, start = [], [], [], [], 0
    for n, context in CHUNKS:
        ids = [perm.pop() for _ in range(-(-(n + context) // BLOCK))]
        for pos in range(context):
            kv[ids[pos // BLOCK], :, pos % BLOCK] = quantize_rows(
                torch.randn(2, kv_heads, head_dim, generator=gen)
            )
        slots += [(ids[pos // BLOCK], pos % BLOCK) for pos in range(context, context + n)]
        spans.append(PrefillSpan(start, start + n, context, torch.tensor(ids)))
        tables.append(ids)
        bounds.append((start, n, context))
        start += n
    slot_blocks, slot_offsets = torch.tensor(slots).T.contiguous()
    torch.ops.scalellm_cpu.write_kv(kv, new_kv, slot_blocks, slot_offsets)
    width = max(map(len, tables))
    tables_t = torch.tensor([ids + [0] * (width - len(ids)) for ids in tables])
    bounds_t, scale = torch.tensor(bounds), head_dim**-0.5

    def prefill() -> torch.Tensor:
        out = torch.full_like(q, 7.0)
        torch.ops.scalellm_cpu.paged_prefill(out, q, kv, tables_t, bounds_t, scale)
        return out

    got = _with_threads(1, prefill)
    assert torch.equal(got, _with_threads(8, prefill))
    reference = Int8KVSDPA(dtype)
    expected = torch.cat([reference.prefill_span(q, new_kv, kv, span, scale) for span in spans])
    tol = _tolerance(dtype)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@needs_kernel
def test_an_int8_cache_takes_the_cpu_kernels_on_cpu_and_dequantizes_elsewhere() -> None:
    """On CPU the C++ kernels read an int8 cache (long prefill chunks past their limit dequantize
    for SDPA, as Int8KVSDPA does); other devices keep Int8KVSDPA."""
    cpu = select_backend(torch.device("cpu"), block_size=16, dtype=torch.float32, head_dim=64, int8_kv=True)
    assert isinstance(cpu, cpu_kernels.CpuPagedDecode) and "int8" in cpu.name
    assert cpu.long_span.__func__ is Int8KVSDPA.prefill_span  # type: ignore[attr-defined]
    plain = select_backend(torch.device("cpu"), block_size=16, dtype=torch.float32, head_dim=64)
    assert isinstance(plain, cpu_kernels.CpuPagedDecode) and "int8" not in plain.name
    elsewhere = select_backend(
        torch.device("meta"), block_size=16, dtype=torch.float32, head_dim=64, int8_kv=True
    )
    assert isinstance(elsewhere, Int8KVSDPA)
    with pytest.raises(RuntimeError, match="head shapes"):  # an int8 row is D + 2 wide
        q = torch.randn(1, 9, 64)
        kv = torch.zeros(2, 2, 16, 3, 64, dtype=torch.int8)
        torch.ops.scalellm_cpu.paged_decode(torch.empty_like(q), q, kv, torch.zeros(1, 1, dtype=torch.long),
                                            torch.tensor([1]), 0.125)  # fmt: skip
