"""The CPU step's parts against their reference paths: the paged decode kernel against gather +
SDPA, oneDNN linear layers against F.linear, the dtype that ``auto`` picks, the backend choice."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from scalellm.engine import cpu_kernels
from scalellm.engine.attention import AttentionMetadata, TorchSDPA, _decode, select_backend
from scalellm.engine.config import EngineConfig, cpu_has_native_bf16
from scalellm.models.config import RopeConfig
from scalellm.models.llama import RotaryEmbedding
from scalellm.models.ops import TorchOps
from scalellm.models.packed_linear import (
    PackedLinear,
    PanelLinear,
    pack_linears,
    packing_supported,
    panels_apply,
    panels_isa,
    panels_take_every_row,
)

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ toolchain for the CPU kernel")


def _cache(dtype: torch.dtype, head_dim: int, kv_heads: int, gen: torch.Generator) -> torch.Tensor:
    """A block-major cache [blocks, layers, 2, block_size, Hkv, D]; layer 1 is the one attended."""
    return torch.randn(12, 3, 2, 4, kv_heads, head_dim, generator=gen).to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), [(64, 9, 3), (128, 4, 4), (16, 6, 2)])
def test_paged_decode_kernel_equals_gather_and_sdpa(
    dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int
) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    kv = _cache(dtype, head_dim, kv_heads, gen)[:, 1]  # strided, as the engine passes it
    tables = torch.tensor([[3, 7, 1, 0], [11, 2, 0, 0], [5, 9, 4, 8]])
    context = torch.tensor([13, 1, 16])  # mid-block, a single token, every slot
    _check_kernel(kv, tables, context, heads, gen)


def _check_kernel(
    kv: torch.Tensor, tables: torch.Tensor, context: torch.Tensor, heads: int, gen: torch.Generator
) -> None:
    """The kernel's output for random queries equals gather + SDPA's."""
    batch, (kv_heads, head_dim), dtype = len(context), kv.shape[-2:], kv.dtype
    qkv = torch.randn(batch, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    q = qkv[:, :heads]  # a view with the fused projection's row stride
    width = tables.shape[1] * kv.shape[2]
    mask = (torch.arange(width).unsqueeze(0) < context.unsqueeze(1))[:, None, None, :]
    expected = _decode(q, kv[:, 0], kv[:, 1], tables, mask, head_dim**-0.5)
    got = torch.empty(q.shape, dtype=dtype)
    torch.ops.scalellm_cpu.paged_decode(got, q, kv, tables, context, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), [(64, 9, 3), (128, 10, 2), (64, 8, 1)])
def test_paged_decode_kernel_on_long_contexts(
    dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int
) -> None:
    """Contexts over many 16-token blocks, lengths off the 16-lane boundary, and more query heads
    per K/V head than the vectorized kernel keeps in registers at once."""
    gen = torch.Generator().manual_seed(7)
    cache = torch.randn(40, 2, 2, 16, kv_heads, head_dim, generator=gen).to(dtype)
    kv = cache[:, 1]
    context = torch.tensor([203, 17, 160, 1])
    tables = torch.randint(0, 40, (4, 13), generator=gen)
    _check_kernel(kv, tables, context, heads, gen)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), [(64, 9, 3), (128, 10, 2)])
def test_paged_decode_work_items_give_the_same_bits(
    dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int
) -> None:
    """With at least 4 requests per thread the vectorized kernels (AVX-512, or AVX2 without it) take
    a request per work item, else a (request, K/V head): 8 requests on 1 thread and on 8 threads take one layout each, and agree
    bit for bit (the same sums in the same order), and with gather + SDPA."""
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(8 * 13, 2, 2, 16, kv_heads, head_dim, generator=gen).to(dtype)
    kv = cache[:, 1]
    context = torch.tensor([203, 17, 160, 1, 16, 33, 190, 64])
    tables = torch.randperm(8 * 13, generator=gen).view(8, 13)
    q = torch.randn(8, heads, head_dim, generator=gen).to(dtype)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 8):
            torch.set_num_threads(n)
            outs.append(torch.empty_like(q))
            torch.ops.scalellm_cpu.paged_decode(outs[-1], q, kv, tables, context, head_dim**-0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    mask = (torch.arange(13 * 16).unsqueeze(0) < context.unsqueeze(1))[:, None, None, :]
    expected = _decode(q, kv[:, 0], kv[:, 1], tables, mask, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0], expected, atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), [(64, 9, 3), (128, 10, 2), (16, 6, 2)])
@pytest.mark.parametrize("threads", [1, 8])
def test_rows_sharing_a_block_table_give_each_rows_own_bits(
    dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int, threads: int
) -> None:
    """A decode and its draft tokens are consecutive rows with one block table, each seeing the
    context up to itself; the kernel reads their K/V once for all of them. Each row's output is
    the one it gets alone, bit for bit (and gather + SDPA's), with rows straddling a block edge,
    a lone row between two such runs, and on 1 and 8 threads (a request per work item, or a
    (request, K/V head)); a request alone on 8 threads has its rows split over several items."""
    gen = torch.Generator().manual_seed(head_dim + heads)
    cache = torch.randn(60, 2, 2, 16, kv_heads, head_dim, generator=gen).to(dtype)
    kv = cache[:, 1]
    perm = torch.randperm(60, generator=gen)
    runs = [(perm[0:13], [29, 30, 31, 32, 33]), (perm[13:26], [7]), (perm[26:39], [200, 201, 202, 203])]
    runs += [(perm[39 + 4 * i : 43 + 4 * i], [50 + i, 51 + i]) for i in range(5)]  # enough for 8 threads
    tables = torch.cat([F.pad(t, (0, 13 - len(t))).expand(len(lens), 13) for t, lens in runs]).contiguous()
    context = torch.tensor([n for _, lens in runs for n in lens])
    q = torch.randn(len(context), heads, head_dim, generator=gen).to(dtype)
    got, alone = torch.empty_like(q), torch.empty_like(q)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        torch.ops.scalellm_cpu.paged_decode(got, q, kv, tables, context, head_dim**-0.5)
        first = torch.empty_like(q[:5])
        torch.ops.scalellm_cpu.paged_decode(first, q[:5], kv, tables[:5], context[:5], head_dim**-0.5)
        assert torch.equal(first, got[:5])
        for row in range(len(context)):
            one = slice(row, row + 1)
            torch.ops.scalellm_cpu.paged_decode(
                alone[one], q[one], kv, tables[one], context[one], head_dim**-0.5
            )
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, alone)
    mask = (torch.arange(13 * 16).unsqueeze(0) < context.unsqueeze(1))[:, None, None, :]
    expected = _decode(q, kv[:, 0], kv[:, 1], tables, mask, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"), [(64, 9, 3), (128, 10, 2)])
def test_contexts_longer_than_a_partition_are_merged_from_their_partitions(
    dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int
) -> None:
    """A long context is attended a partition of 1024 tokens at a time (csrc/paged_decode.cpp's
    kPartitionTokens; the last one also takes a remainder under 256), in items of its own, and
    merged: a long decode and its drafts, whose contexts have 2 partitions (2302, 2303) and 3
    (2304, 2600), against gather + SDPA; a row of one partition (1279) and one of two (1280);
    each row's output the one it gets alone, on 1 and 8 threads and beside 7 short decodes (the
    partitions depend on a row's own length only)."""
    gen = torch.Generator().manual_seed(head_dim)
    width = 170  # blocks of 16 tokens: 2720 tokens a table
    cache = torch.randn(7 + 3 * width, 2, 2, 16, kv_heads, head_dim, generator=gen).to(dtype)
    kv = cache[:, 1]
    perm = torch.randperm(len(cache), generator=gen)
    long_rows = [2302, 2303, 2304, 2600]  # a decode and three drafts: 2 partitions, then 3
    tables = [perm[:width]] * len(long_rows) + [perm[width : 2 * width], perm[2 * width : 3 * width]]
    context = [*long_rows, 1279, 1280]
    tables += [F.pad(perm[3 * width + i : 3 * width + i + 1], (0, width - 1)) for i in range(7)]
    context += [5 + i for i in range(7)]
    tables_t, context_t = torch.stack(tables).contiguous(), torch.tensor(context)
    q = torch.randn(len(context), heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    previous = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 8):
            torch.set_num_threads(threads)
            got[threads] = torch.empty_like(q)
            torch.ops.scalellm_cpu.paged_decode(got[threads], q, kv, tables_t, context_t, scale)
        alone = torch.empty_like(q)
        for row in range(len(context)):
            one = slice(row, row + 1)
            torch.ops.scalellm_cpu.paged_decode(alone[one], q[one], kv, tables_t[one], context_t[one], scale)
        first = torch.empty_like(q[:4])  # the long request by itself: one request on 8 threads
        torch.ops.scalellm_cpu.paged_decode(first, q[:4], kv, tables_t[:4], context_t[:4], scale)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got[1], got[8])
    assert torch.equal(got[8], alone)
    assert torch.equal(first, got[8][:4])
    mask = (torch.arange(width * 16).unsqueeze(0) < context_t.unsqueeze(1))[:, None, None, :]
    expected = _decode(q, kv[:, 0], kv[:, 1], tables_t, mask, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[8], expected, atol=tol, rtol=tol)


@needs_kernel
def test_paged_decode_refuses_a_context_its_block_table_cannot_hold() -> None:
    """A context longer than its table's blocks (or empty) would read outside them: an error."""
    kv = torch.randn(8, 2, 16, 3, 64)
    q, out = torch.randn(2, 9, 64), torch.empty(2, 9, 64)
    tables = torch.tensor([[0, 1], [2, 3]])
    for bad in ([33, 5], [5, 0]):
        with pytest.raises(RuntimeError, match="outside its block table"):
            torch.ops.scalellm_cpu.paged_decode(out, q, kv, tables, torch.tensor(bad), 0.125)
    torch.ops.scalellm_cpu.paged_decode(out, q, kv, tables, torch.tensor([32, 1]), 0.125)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [576, 40])  # SmolLM2's hidden size; one off the 16-lane vectors
def test_fused_ops_equal_torch_ops(dtype: torch.dtype, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    fused, ref = cpu_kernels.CpuFusedOps(), TorchOps()
    x, residual, weight = (torch.randn(n, width, generator=gen).to(dtype) for n in (5, 5, 1))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        fused.rms_norm(x, weight[0], 1e-5), ref.rms_norm(x, weight[0], 1e-5), atol=tol, rtol=tol
    )
    res_fused, res_ref = residual.clone(), residual.clone()
    normed = fused.rms_norm(x, weight[0], 1e-5, res_fused)
    torch.testing.assert_close(normed, ref.rms_norm(x, weight[0], 1e-5, res_ref), atol=tol, rtol=tol)
    torch.testing.assert_close(res_fused, res_ref, atol=0, rtol=0)  # the stream itself: exact
    gate_up = 4 * torch.randn(5, 2 * width, generator=gen).to(dtype)
    torch.testing.assert_close(fused.silu_mul(gate_up), ref.silu_mul(gate_up), atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_at_extremes(dtype: torch.dtype) -> None:
    """The vectorized e^x clamps its argument (vec256.h, vec512.h): SiLU far out on both sides."""
    gate = torch.tensor(
        [-200.0, -100.0, -88.0, -87.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 87.0, 88.0, 100.0, 200.0] * 2
    )
    gate_up = torch.cat((gate, torch.full_like(gate, 1.5))).unsqueeze(0).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    got = cpu_kernels.CpuFusedOps().silu_mul(gate_up)
    torch.testing.assert_close(got, TorchOps().silu_mul(gate_up), atol=tol, rtol=tol)
    assert torch.isfinite(got).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 16])
def test_fused_rope_equals_torch_rope(dtype: torch.dtype, head_dim: int) -> None:
    """On q and k heads inside a fused projection's output, as the model rotates them. float32 is
    bit for bit (two products, then their sum, each rounded); bfloat16 rounds once instead."""
    gen = torch.Generator().manual_seed(head_dim)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), head_dim, 64)
    cos, sin = rotary.tables(torch.tensor([0, 3, 17, 63]), dtype)
    qkv = torch.randn(4, 5, head_dim, generator=gen).to(dtype)
    fused, ref = qkv.clone(), qkv.clone()
    cpu_kernels.CpuFusedOps().rope_(fused[:, :4], cos, sin)
    TorchOps().rope_(ref[:, :4], cos, sin)
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused, ref, atol=tol, rtol=tol)
    assert torch.equal(fused[:, 4], qkv[:, 4])  # the V head is left alone


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_equals_indexed_copy(dtype: torch.dtype) -> None:
    """The step's K/V rows land in the same slots of the strided layer view as torch's indexed copy,
    and nothing else changes; a slot outside the cache is refused."""
    gen = torch.Generator().manual_seed(3)
    cache = _cache(dtype, 64, 3, gen)
    qkv = torch.randn(5, 9 + 2 * 3, 64, generator=gen).to(dtype)
    new_kv = qkv[:, 9:].unflatten(1, (2, 3))  # [T, 2, Hkv, D], a view as the model passes it
    meta = dataclasses.replace(
        _meta(torch.tensor([4, 4, 0, 11, 7]), torch.tensor([0, 3, 2, 1, 3])),
        backend=cpu_kernels.CpuPagedDecode(None),
    )
    expected = cache.clone()
    TorchSDPA().write_kv(expected[:, 1], new_kv, meta)
    cpu_kernels.CpuPagedDecode(None).write_kv(cache[:, 1], new_kv, meta)
    assert torch.equal(cache, expected)
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_kernels.CpuPagedDecode(None).write_kv(
            cache[:, 1], new_kv, _meta(torch.tensor([4, 4, 0, 12, 7]), meta.slot_offsets)
        )


def _meta(slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> AttentionMetadata:
    return AttentionMetadata(slot_blocks, slot_offsets, 0, None, None, (), TorchSDPA())


@needs_kernel
def test_cpu_backend_is_chosen_on_cpu_and_torch_sdpa_elsewhere() -> None:
    assert isinstance(
        select_backend(torch.device("cpu"), block_size=16, dtype=torch.float32, head_dim=64),
        cpu_kernels.CpuPagedDecode,
    )
    assert isinstance(
        select_backend(torch.device("meta"), block_size=16, dtype=torch.float32, head_dim=64), TorchSDPA
    )


@pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32), reason="no oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 48, generator=gen))
    x = torch.randn(2, 5, 48, generator=gen)
    packed = PackedLinear(linear)
    torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), atol=1e-4, rtol=1e-5)
    flat = x[1]  # [tokens, in]: the engine's shape, which skips the reshapes
    torch.testing.assert_close(packed(flat), F.linear(flat, linear.weight, linear.bias), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32), reason="no oneDNN")
def test_pack_linears_keeps_a_tied_embedding_weight() -> None:
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(10, 8), "head": torch.nn.Linear(8, 10, bias=False)}
    )
    embed = model["embed"]
    assert isinstance(embed, torch.nn.Embedding)
    model["head"].weight = embed.weight
    assert pack_linears(model) == 1
    assert isinstance(model["head"], PackedLinear)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model["head"](x), x @ embed.weight.T, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 50, 64, 67])
@pytest.mark.parametrize(("features", "bias"), [((48, 80), False), ((37, 22), True), ((576, 1536), False)])
def test_bf16_kernel_equals_float32_products_rounded_once(
    rows: int, features: tuple[int, int], bias: bool
) -> None:
    """Odd sizes (N not a multiple of the 16-column panels, rows not of the 6-row micro-kernel,
    50 rows past a 48-row chunk) and the engine's; the reference: the same bfloat16 values
    multiplied and summed in float64, rounded."""
    gen = torch.Generator().manual_seed(rows)
    k, n = features
    linear = torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen))
        if linear.bias is not None:
            linear.bias.copy_(torch.randn(n, generator=gen))
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    exact = F.linear(
        x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double()
    )
    kernel_only = PanelLinear(linear, max_kernel_rows=1 << 30)
    # PanelLinear as chosen here (on AVX-512 CPUs: oneDNN above 16 rows), and the kernel alone
    for path in (PanelLinear(linear), kernel_only):
        got = path(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        # float32 sums in another order than float64's: at most one bfloat16 step apart
        torch.testing.assert_close(
            got.double(), exact.to(torch.bfloat16).double(), atol=1e-3 * k**0.5, rtol=8e-3
        )
        batched = path(x.unsqueeze(0))  # [1, rows, k]: the reshape path
        torch.testing.assert_close(batched[0], got, atol=0, rtol=0)
        # forward_float (the logits): the same sums unrounded, which round to forward's bits
        wide_sums = path.forward_float(x)
        assert wide_sums.dtype == torch.float32 and wide_sums.shape == (rows, n)
        torch.testing.assert_close(wide_sums.to(torch.bfloat16), got, atol=0, rtol=0)
        torch.testing.assert_close(wide_sums.double(), exact, atol=1e-5 * k**0.5, rtol=1e-5)
        assert path.forward_float(x.unsqueeze(0)).shape == (1, rows, n)
    strided = torch.randn(rows, 2 * k, generator=gen).to(torch.bfloat16)[:, :k]  # rows with a gap between
    torch.testing.assert_close(kernel_only(strided), kernel_only(strided.contiguous()), atol=0, rtol=0)
    # the 8-lane kernel's sums are the float32 panels' over the widened values, in the same order:
    # the same float32 result, rounded once (bfloat16 panels are only stored interleaved);
    # vdpbf16ps adds a k pair's two products per step, so AVX512-BF16's differ in the last bits
    wide = torch.nn.Linear(k, n, bias=bias)
    wide.load_state_dict({name: value.float() for name, value in linear.state_dict().items()})
    exact_order = panels_isa(torch.bfloat16) != "avx512_bf16"
    torch.testing.assert_close(
        kernel_only(x),
        PanelLinear(wide)(x.float()).to(torch.bfloat16),
        atol=0 if exact_order else 1e-3 * k**0.5,
        rtol=0 if exact_order else 8e-3,
    )
    # and a row's output does not depend on the rows beside it
    for row in (0, rows - 1):
        torch.testing.assert_close(kernel_only(x[row : row + 1])[0], kernel_only(x)[row], atol=0, rtol=0)


@needs_kernel
def test_bf16_weights_have_one_copy_where_our_kernel_takes_every_row() -> None:
    """AVX2 CPUs (8-lane kernel) and AVX512-BF16 ones (vdpbf16ps over k pairs) run a bfloat16
    model's linear layers through the kernel at every row count, one copy of the weight; other
    AVX-512 CPUs keep a float32 copy for oneDNN above ``max_kernel_rows``."""
    panels = PanelLinear(torch.nn.Linear(64, 33).to(torch.bfloat16))
    if panels_take_every_row(torch.bfloat16):
        assert panels.packed is None and "max_kernel_rows=all" in repr(panels)
    elif packing_supported(torch.device("cpu"), torch.float32):
        assert panels.packed is not None and panels.packed.dtype != torch.bfloat16
    # the panels' layout follows the kernel: k pairs for vdpbf16ps, else one k a row of 16
    pairs = panels_isa(torch.bfloat16) == "avx512_bf16"
    assert panels.panels.shape == ((3, 32, 32) if pairs else (3, 64, 16))
    odd = PanelLinear(torch.nn.Linear(7, 16).to(torch.bfloat16))
    assert odd.panels.shape == ((1, 4, 32) if pairs else (1, 7, 16))


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_float32_panels_match_float64_and_do_not_depend_on_the_batch(bias: bool) -> None:
    """float32 through the panels (every row count on CPUs with AVX2, AVX-512 included): close
    to a float64 reference, and each row's output bit for bit the same alone, in a batch of 70
    (past the 48-row chunk, not a multiple of the 6-row micro-kernel) or in the 3-d reshape path."""
    gen = torch.Generator().manual_seed(7)
    k, n = 576, 200  # N not a multiple of the 16-column panels
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if linear.bias is not None:
            linear.bias.copy_(torch.randn(n, generator=gen))
    panels = PanelLinear(linear)
    assert panels.packed is None  # one copy of a float32 weight: the panels
    x = torch.randn(70, k, generator=gen)
    got = panels(x)
    assert got.dtype == torch.float32 and got.shape == (70, n)
    exact = F.linear(
        x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double()
    )
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)
    for rows in (1, 5, 6, 49):
        torch.testing.assert_close(panels(x[:rows]), got[:rows], atol=0, rtol=0)
    torch.testing.assert_close(panels(x.unsqueeze(0))[0], got, atol=0, rtol=0)
    strided = torch.randn(70, 2 * k, generator=gen)[:, :k]  # rows with a gap: widened into a copy
    torch.testing.assert_close(panels(strided), panels(strided.contiguous()), atol=0, rtol=0)


def test_panels_are_chosen_where_our_kernel_is_the_faster() -> None:
    """float32: on every CPU with AVX2 (AVX-512's 16-lane kernel too); bfloat16: without bfloat16
    arithmetic for oneDNN, or with AVX512-BF16 and no AMX; never off CPU or for other dtypes."""
    cpu = torch.device("cpu")
    assert (panels_isa(torch.float32) == "none") == (not cpu_kernels.available())
    assert panels_apply(cpu, torch.float32) == (panels_isa(torch.float32) not in ("none", "scalar"))
    if panels_isa(torch.bfloat16) == "avx512_bf16":
        assert panels_apply(cpu, torch.bfloat16) == (not torch.cpu._is_amx_tile_supported())
    assert not panels_apply(torch.device("meta"), torch.float32)
    assert not panels_apply(cpu, torch.float16)


@needs_kernel
def test_bf16_linear_leaves_a_tied_embedding_weight_as_it_was() -> None:
    """The head packs its own panels from the shared weight; the embedding keeps the weight and
    both compute with the same values."""
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(10, 8), "head": torch.nn.Linear(8, 10, bias=False)}
    ).to(torch.bfloat16)
    embed = model["embed"]
    assert isinstance(embed, torch.nn.Embedding)
    model["head"].weight = embed.weight
    before = embed.weight.detach().clone()
    assert pack_linears(model, PanelLinear) == 1
    head = model["head"]
    assert isinstance(head, PanelLinear) and isinstance(embed.weight, torch.nn.Parameter)
    assert torch.equal(embed.weight, before)
    x = torch.randn(3, 8).to(torch.bfloat16)
    expected = F.linear(x.double(), before.double()).to(torch.bfloat16)
    torch.testing.assert_close(head(x), expected, atol=1e-2, rtol=8e-3)


def test_auto_dtype_on_cpu_follows_native_bf16_and_explicit_wins() -> None:
    auto = EngineConfig(model="m", device="cpu").torch_dtype("float32")
    assert auto == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert EngineConfig(model="m", device="cpu", dtype="float32").torch_dtype("bfloat16") == torch.float32


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # float16: torch's
@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 49152])
def test_argmax_kernel_gives_torchs_indices(dtype: torch.dtype, vocab: int) -> None:
    """First of a repeated maximum, rows of -inf and of zeros, NaN (torch picks the first one,
    before or after a larger value), vocabularies on and off the 8-, 16- and 32-lane boundaries
    (AVX2, AVX-512, AVX2's four-vector NaN check), and a strided view of wider rows."""
    logits = torch.randn(7, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    logits[1, vocab // 2] = logits[1].max()
    logits[2] = float("-inf")
    logits[3] = 0.0
    logits[4, vocab - 1] = float("nan")
    if vocab > 3:
        logits[5, 3] = float("nan")
        logits[5, vocab - 1] = float("nan")
        logits[6, 1] = float("inf")
        logits[6, vocab * 2 // 3] = float("nan")
    assert torch.equal(cpu_kernels.argmax(logits), logits.argmax(dim=-1))
    wide = torch.randn(3, vocab + 24).to(dtype)[:, :vocab]
    assert torch.equal(cpu_kernels.argmax(wide), wide.argmax(dim=-1))
