"""The experts of a sparse MoE block as two grouped matmuls in Triton (the GPU path; the torch
loop in models/moe.py is the reference, and the CPU path).

The step's (token, choice) pairs are sorted by expert (stable, as the reference) and each local
expert's run is padded to a multiple of BLOCK_M, so every tile of BLOCK_M rows belongs to one
expert; one launch then covers every expert:

    slot:     | e0 e0 e0 pad | e1 e1 e1 e1 | e3 pad pad pad |      (BLOCK_M = 4; e2 got no token)
    tile:     |   expert 0   |  expert 1   |    expert 3    |      tile_expert[i] = its local expert
    rows[s]:  the token row of slot s (padding: -1, loads zeros, stores nothing)

    h   = grouped_matmul(x,   rows,        w_gate_up)            [S, 2I]  rows of x gathered
    a   = silu(h[:, :I]) * h[:, I:]                               [S, I]
    y   = grouped_matmul(a,   arange(S),   w_down, pair_weight)  [S, H]   scaled by the routing weight
    out = index_add over each slot's token                        [T, H]

Each program computes a BLOCK_M x BLOCK_N tile of ``C = A[rows] @ W[tile_expert].T`` with an
fp32 accumulator over K in BLOCK_K steps. The sums are tiled, so the result equals the reference
within float rounding, not bit for bit (tests: TRITON_INTERPRET=1 on CPU, small shapes).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
"""Whether triton is importable (the GPU wheels of torch bring it; CPU installs usually lack it)."""

if AVAILABLE:
    import triton
    import triton.language as tl

    from scalellm.models.triton_jit import FP_FUSION, Jitted

    def _grouped_matmul_body(  # type: ignore[no-untyped-def]
        a_ptr, rows_ptr, w_ptr, tile_expert_ptr, scale_ptr, c_ptr, N, K,
        stride_am, stride_we, stride_wn, stride_cm,
        HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        col_block = tl.program_id(1)
        expert = tl.load(tile_expert_ptr + tile)
        slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(rows_ptr + slots)
        valid = rows >= 0
        cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # (tl.zeros is itself jitted: the
        # interpreter cannot call it unless TRITON_INTERPRET was set before triton was imported)
        a_rows = a_ptr + tl.where(valid, rows, 0)[:, None].to(tl.int64) * stride_am
        w_rows = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k[None, :] < K), other=0.0)
            w = tl.load(w_rows + k[:, None], mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc += tl.dot(a, w, input_precision="ieee")
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + slots, mask=valid, other=0.0)[:, None].to(tl.float32)
        c = c_ptr + slots[:, None].to(tl.int64) * stride_cm + cols[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))

    _kernel = Jitted(_grouped_matmul_body)


def grouped_matmul(
    a: torch.Tensor,
    rows: torch.Tensor,
    w: torch.Tensor,
    tile_expert: torch.Tensor,
    scale: torch.Tensor | None = None,
    block: tuple[int, int, int] = (64, 64, 32),
) -> torch.Tensor:
    """``C[s] = A[rows[s]] @ W[tile_expert[s // BLOCK_M]].T`` (times ``scale[s]``) for every slot
    s whose row is not -1 (those rows of C are left as zeros).

    a [M, K]; rows [S] int32 (S a multiple of BLOCK_M); w [E, N, K]; tile_expert [S / BLOCK_M]
    int32; scale [S] or None. Returns C [S, N] in a's dtype."""
    block_m, block_n, block_k = block
    num_slots, (_, n, k) = rows.shape[0], w.shape
    assert num_slots % block_m == 0 and tile_expert.shape[0] == num_slots // block_m
    assert a.stride(1) == 1 and w.stride(2) == 1, "the reduction dimension must be contiguous"
    c = torch.zeros(num_slots, n, dtype=a.dtype, device=a.device)
    grid = (num_slots // block_m, triton.cdiv(n, block_n))
    _kernel()[grid](
        a, rows, w, tile_expert, scale if scale is not None else rows, c, n, k,
        a.stride(0), w.stride(0), w.stride(1), c.stride(0),
        HAS_SCALE=scale is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return c


def pad_by_expert(
    ids: torch.Tensor, experts: range, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay the (token, choice) pairs of ``ids [T, k]`` that go to ``experts`` out in slots, each
    expert's run (in the reference's stable order) padded to a multiple of ``block_m``.

    Returns (pair [S] int64: the flat pair index of each slot, -1 for padding; tile_expert
    [S / block_m] int32: the local expert of each tile; counts per expert)."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    local = counts[experts.start : experts.stop]
    padded = (local + block_m - 1) // block_m * block_m
    num_slots = int(padded.sum().item())
    starts = torch.cumsum(padded, 0) - padded  # each local expert's first slot
    firsts = (torch.cumsum(counts, 0) - counts)[experts.start : experts.stop]  # ... in `order`
    pair = torch.full((num_slots,), -1, dtype=torch.long, device=ids.device)
    expert_of = torch.repeat_interleave(torch.arange(len(experts), device=ids.device), local)
    within = (
        torch.arange(int(local.sum().item()), device=ids.device) - (torch.cumsum(local, 0) - local)[expert_of]
    )
    pair[starts[expert_of] + within] = order[firsts[expert_of] + within]
    tile_expert = torch.repeat_interleave(
        torch.arange(len(experts), device=ids.device, dtype=torch.int32), padded // block_m
    )
    return pair, tile_expert, counts


def experts_forward(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    experts: range,
    num_experts: int,
    silu_mul: Callable[[torch.Tensor], torch.Tensor],
    block: tuple[int, int, int] = (64, 64, 32),
) -> torch.Tensor:
    """SparseMoeBlock.experts_forward with both matmuls grouped over the local experts: x [T, H],
    weights / ids [T, k] -> [T, H] (this rank's partial sum, as the reference)."""
    k = ids.shape[1]
    pair, tile_expert, _ = pad_by_expert(ids, experts, num_experts, block[0])
    out = torch.zeros_like(x)
    if pair.numel() == 0:
        return out
    valid = pair >= 0
    token = torch.where(valid, pair // k, -1).to(torch.int32)
    h = grouped_matmul(x, token, w_gate_up, tile_expert, block=block)
    act = silu_mul(h).contiguous()
    slots = torch.where(valid, torch.arange(pair.numel(), device=x.device), -1).to(torch.int32)
    scale = torch.where(valid, weights.flatten()[pair.clamp(min=0)], 0).to(x.dtype)
    y = grouped_matmul(act, slots, w_down, tile_expert, scale, block=block)
    out.index_add_(0, token[valid].long(), y[valid])
    return out
