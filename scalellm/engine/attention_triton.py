"""Paged decode attention in Triton: the GPU backend (attention.select_backend picks it on CUDA
where triton imports and the KV cache is not int8).

Decodes read K/V straight from the cache blocks through the block table; nothing is gathered
into a padded copy. One program per (sequence, K/V head) pair: the G = Hq / Hkv query heads that
share that K/V head are the rows of one tile, so each K/V token is loaded once for all of them:

    grid (B, Hkv)           program (b, j): query heads j*G .. j*G+G-1 of sequence b
    q tile    [BLOCK_G, D]  (rows >= G are zero padding: tl.dot needs 16 rows)
    for tokens n0 .. n0+BLOCK_N of the context (BLOCK_N a multiple of nothing in particular):
        block = table[b, n // block_size], slot = n % block_size
        K, V  [BLOCK_N, D]  <- kv[block, 0|1, slot, j, :]        (int64 addressing)
        s     = q @ K.T * scale                [BLOCK_G, BLOCK_N], masked past context_len
        online softmax in float32: m (running max), total (running sum), acc rescaled by exp(m - m')
        acc  += p @ V
    out[b, j*G + g] = acc[g] / l[g]

Not split-K: one program walks the whole context, which is enough at the batch sizes where
(B x Hkv) programs fill the device; a long-context batch-1 decode leaves most of it idle.
float32, bfloat16 and float16 caches; the scores, softmax and accumulator are float32 (float32
inputs use IEEE dot products, not TF32). Cache writes are one small kernel (``write_kv``).
A step's prefill chunks run in one launch of a second kernel (``paged_prefill``): the same
tiles and softmax, query rows of a (chunk, K/V head) pair, each chunk's context and its own K/V
read through its block table (written before attention, as for decodes), a causal mask within
the chunk.

Both are tested on CPU under TRITON_INTERPRET=1 against TorchSDPA
(tests/unit/test_attention_triton.py). One difference there: Triton 3.9's interpreter computes
tl.dot of bfloat16 tiles wrongly (errors of 1e10 on a 16x16 product), so on CPU tensors (the
interpreter's only case) the dot inputs are upcast to float32 first; on CUDA half and bfloat16
tiles go into tl.dot as they are (tensor cores, float32 accumulation). That variant is compiled
for sm_90 in CI (Triton's bundled ptxas, no GPU needed); the decode kernel was run on an H200
against TorchSDPA at 8B's head shape (SCALELLM_TEST_DEVICE=cuda), the prefill kernel not yet.
"""

from __future__ import annotations

import importlib.util

import torch

from scalellm.engine.attention import AttentionMetadata

AVAILABLE = importlib.util.find_spec("triton") is not None
"""Whether triton is importable (the CUDA wheels of torch bring it; CPU installs usually lack it)."""

if AVAILABLE:
    import triton
    import triton.language as tl

    # tl.reduce with triton_jit's combine functions, not tl.max / tl.sum (see triton_jit)
    from scalellm.models.triton_jit import FP_FUSION, Jitted, add_combine, max_combine

    def _paged_decode_body(  # type: ignore[no-untyped-def]
        out_ptr, q_ptr, kv_ptr, table_ptr, lens_ptr, scale,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_tb,
        stride_kb, stride_kv, stride_ks, stride_kh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + g
        q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
        q = tl.load(
            q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=q_mask,
            other=0.0,
        )
        if UPCAST_DOT:
            q = q.to(tl.float32)
        context_len = tl.load(lens_ptr + seq)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # (tl.zeros is itself jitted: see
        total = tl.full((BLOCK_G,), 0.0, tl.float32)  # models/moe_triton.py)
        acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)
        head_base = kv_ptr + kv_head.to(tl.int64) * stride_kh
        for n0 in range(0, context_len, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < context_len
            block = tl.load(table_ptr + seq.to(tl.int64) * stride_tb + n // BLOCK_SIZE, mask=valid, other=0)
            rows = head_base + block.to(tl.int64) * stride_kb + (n % BLOCK_SIZE).to(tl.int64) * stride_ks
            kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
            k = tl.load(rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(rows[:, None] + stride_kv + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.reduce(s, 1, max_combine))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.reduce(p, 1, add_combine)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m = m_new
        out = acc / total[:, None]
        o = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o, out.to(out_ptr.dtype.element_ty), mask=q_mask)

    _kernel = Jitted(_paged_decode_body)

    def _write_kv_body(  # type: ignore[no-untyped-def]
        kv_ptr, new_ptr, blocks_ptr, offsets_ptr,
        stride_nt, stride_n2, stride_kb, stride_kv, stride_ks,
        WIDTH: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0).to(tl.int64)
        half = tl.program_id(1).to(tl.int64)  # 0: K, 1: V
        cols = tl.arange(0, BLOCK)
        mask = cols < WIDTH
        block = tl.load(blocks_ptr + token).to(tl.int64)
        slot = tl.load(offsets_ptr + token).to(tl.int64)
        row = tl.load(new_ptr + token * stride_nt + half * stride_n2 + cols, mask=mask)
        tl.store(kv_ptr + block * stride_kb + half * stride_kv + slot * stride_ks + cols, row, mask=mask)

    _write_kv = Jitted(_write_kv_body)

    def _paged_prefill_body(  # type: ignore[no-untyped-def]
        out_ptr, q_ptr, kv_ptr, table_ptr, bounds_ptr, scale,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_tb,
        stride_kb, stride_kv, stride_ks, stride_kh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):  # fmt: skip
        span = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        kv_head = tl.program_id(2)
        start = tl.load(bounds_ptr + span * 3)
        length = tl.load(bounds_ptr + span * 3 + 1)
        context = tl.load(bounds_ptr + span * 3 + 2)
        tokens_per_tile = BLOCK_R // GROUP
        first = tile * tokens_per_tile
        if first < length:
            r = tl.arange(0, BLOCK_R)
            d = tl.arange(0, BLOCK_D)
            token = first + r // GROUP  # row r: token first + r // G, query head j*G + r % G
            heads = kv_head * GROUP + r % GROUP
            rows_ok = (r < tokens_per_tile * GROUP) & (token < length)
            q_mask = rows_ok[:, None] & (d[None, :] < HEAD_DIM)
            q_rows = (start + token).to(tl.int64) * stride_qt + heads * stride_qh
            q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
            if UPCAST_DOT:
                q = q.to(tl.float32)
            position = context + token  # each row's query position: it sees keys 0 .. position
            end = context + tl.minimum(first + tokens_per_tile, length)
            m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
            total = tl.full((BLOCK_R,), 0.0, tl.float32)
            acc = tl.full((BLOCK_R, BLOCK_D), 0.0, tl.float32)
            head_base = kv_ptr + kv_head.to(tl.int64) * stride_kh
            for n0 in range(0, end, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                valid = n < end
                block = tl.load(table_ptr + span * stride_tb + n // BLOCK_SIZE, mask=valid, other=0)
                kv_rows = (
                    head_base + block.to(tl.int64) * stride_kb + (n % BLOCK_SIZE).to(tl.int64) * stride_ks
                )
                kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
                k = tl.load(kv_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(kv_rows[:, None] + stride_kv + d[None, :], mask=kv_mask, other=0.0)
                if UPCAST_DOT:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                s = tl.where(valid[None, :] & (n[None, :] <= position[:, None]), s, float("-inf"))
                m_new = tl.maximum(m, tl.reduce(s, 1, max_combine))  # finite: key 0 is in every row's view
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                total = total * alpha + tl.reduce(p, 1, add_combine)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                m = m_new
            out = acc / total[:, None]
            o_rows = (start + token).to(tl.int64) * stride_ot + heads * stride_oh
            tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)

    _prefill_kernel = Jitted(_paged_prefill_body)


def paged_decode(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_n: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D]; kv [num_blocks, 2, block_size, Hkv, D] (a strided layer view is fine);
    block_tables [B, max_blocks]; context_lens [B] (each >= 1) -> [B, Hq, D] in q's dtype.

    ``block_n``: context tokens per tile; None: 64, or 32 for a float32 cache (~43 KB of shared
    memory on sm_90 instead of ~78). Fixed, not autotuned: on an H200 triton.autotune's picks
    (tiles of 32-128, 4 or 8 warps, 2 or 3 stages) changed from run to run with timing noise and
    were no faster at batch 64 and 256 (docs/benchmarks.md), and a pick that changes the tile
    changes the summation order, so bfloat16 greedy output would depend on the timing."""
    batch, num_heads, head_dim = q.shape
    _, two, block_size, num_kv_heads, _ = kv.shape
    if block_n is None:
        block_n = 32 if kv.element_size() == 4 else 64
    assert two == 2 and num_heads % num_kv_heads == 0 and block_n >= 16
    assert q.stride(2) == 1 and kv.stride(4) == 1 and block_tables.stride(1) == 1
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _kernel()[(batch, num_kv_heads)](
        out, q, kv, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n, UPCAST_DOT=not q.is_cuda, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


def paged_prefill(
    q: torch.Tensor,
    kv: torch.Tensor,
    tables: torch.Tensor,
    bounds: torch.Tensor,
    max_length: int,
    scale: float,
    out: torch.Tensor,
    block_r: int | None = None,
    block_n: int | None = None,
) -> None:
    """Every prefill chunk of a step in one launch, into its rows of ``out``. q and out [T, Hq,
    D]; kv [num_blocks, 2, block_size, Hkv, D] (a strided layer view), holding each chunk's own
    K/V already (written before attention); tables [S, max_blocks] each chunk's blocks from
    position 0 on; bounds [S, 3] (start row in q, length, tokens cached before it); max_length
    the longest chunk (sizes the grid). ``block_r``: rows of a query tile (query heads of a K/V
    head times tokens); ``block_n``: keys per tile; None: 64, or 32 for a float32 cache.

        grid (S, tiles of the longest chunk, Hkv)    program (s, t, j): chunk s, K/V head j
        rows   r = 0 .. block_r - 1: token t*R + r // G, query head j*G + r % G  (R = block_r // G)
        keys   0 .. context + the tile's last token, read through table[s] as the decode kernel
               does; row (token i) sees keys <= context + i (causal within the chunk)

    Programs past their chunk's length return at once. Like the decode kernel: float32 scores,
    softmax and accumulator, IEEE dot products for float32 inputs."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, two, block_size, num_kv_heads, _ = kv.shape
    num_spans = bounds.shape[0]
    if num_spans == 0:
        return
    wide = 32 if kv.element_size() == 4 else 64
    group = num_heads // num_kv_heads
    block_r = max(block_r or wide, 16, triton.next_power_of_2(group))
    block_n = block_n or wide
    assert two == 2 and num_heads % num_kv_heads == 0 and block_n >= 16
    assert q.stride(2) == 1 and out.stride(2) == 1 and kv.stride(4) == 1 and tables.stride(1) == 1
    assert bounds.is_contiguous() and bounds.shape[1] == 3
    tiles = -(-max_length // (block_r // group))
    _prefill_kernel()[(num_spans, tiles, num_kv_heads)](
        out, q, kv, tables, bounds, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_R=block_r, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n, UPCAST_DOT=not q.is_cuda, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def write_kv(
    kv: torch.Tensor, new_kv: torch.Tensor, slot_blocks: torch.Tensor, slot_offsets: torch.Tensor
) -> None:
    """kv[slot_blocks[t], :, slot_offsets[t]] = new_kv[t] in one launch (torch's indexed
    assignment takes more): new_kv [T, 2, Hkv, D] with each token's K and V rows contiguous."""
    tokens, _, num_kv_heads, head_dim = new_kv.shape
    if tokens == 0:
        return
    assert new_kv.stride(3) == 1 and new_kv.stride(2) == head_dim and kv.stride(3) == head_dim
    assert kv.stride(4) == 1
    width = num_kv_heads * head_dim
    _write_kv()[(tokens, 2)](
        kv, new_kv, slot_blocks, slot_offsets,
        new_kv.stride(0), new_kv.stride(1), kv.stride(0), kv.stride(1), kv.stride(2),
        WIDTH=width, BLOCK=triton.next_power_of_2(width), enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


class TritonPagedDecode:
    """Decodes, prefill chunks and cache writes through the Triton kernels above."""

    name = "triton-paged (Triton decode and varlen prefill kernels)"
    graph_safe = True  # the context loop's bound is read from context_lens on the device

    def __init__(self, block_n: int | None = None, block_r: int | None = None) -> None:
        """``block_n``: context tokens per tile; ``block_r``: query rows per prefill tile; None:
        paged_decode's and paged_prefill's defaults."""
        self.block_n = block_n
        self.block_r = block_r

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        return meta

    def write_kv(self, kv: torch.Tensor, new_kv: torch.Tensor, meta: AttentionMetadata) -> None:
        write_kv(kv, new_kv, meta.slot_blocks, meta.slot_offsets)

    def decode(
        self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        return paged_decode(q, kv, meta.decode_block_tables, meta.decode_context_lens, scale, self.block_n)

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
        assert meta.prefill_tables is not None and meta.prefill_bounds is not None
        longest = max(span.end - span.start for span in meta.prefills)
        paged_prefill(
            q, kv, meta.prefill_tables, meta.prefill_bounds, longest, scale, out, self.block_r, self.block_n
        )
