"""The grouped expert matmul in Triton against the torch reference (SparseMoeBlock's loop), on
CPU through Triton's interpreter (TRITON_INTERPRET=1) on small shapes; skipped without triton."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalellm.models import moe_triton

pytestmark = pytest.mark.skipif(not moe_triton.AVAILABLE, reason="triton is not installed")

BLOCK = (16, 32, 16)  # tl.dot needs 16 or more on each side


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _reference(x, weights, ids, w_gate_up, w_down, experts: range) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Each local expert over its tokens, added back in expert order (models/moe.py)."""
    out = torch.zeros_like(x)
    for local, expert in enumerate(experts):
        token, choice = torch.nonzero(ids == expert, as_tuple=True)
        if token.numel():
            h = _silu_mul(F.linear(x[token], w_gate_up[local]))
            out.index_add_(0, token, F.linear(h, w_down[local]) * weights[token, choice, None])
    return out


def test_grouped_matmul_gathers_rows_per_expert_tile_and_scales() -> None:
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(10, 40, generator=g), torch.randn(3, 24, 40, generator=g)
    rows = torch.tensor([3, 0, 7, *[-1] * 13, 1, 1, 9, 2, 5, *[-1] * 11], dtype=torch.int32)
    tile_expert = torch.tensor([2, 0], dtype=torch.int32)
    scale = torch.rand(32, generator=g)
    c = moe_triton.grouped_matmul(a, rows, w, tile_expert, scale, block=BLOCK)
    for s, row in enumerate(rows.tolist()):
        if row < 0:
            assert not c[s].any()
        else:
            expected = a[row] @ w[tile_expert[s // 16]].T * scale[s]
            torch.testing.assert_close(c[s], expected, rtol=1e-5, atol=1e-5)


def test_pad_by_expert_keeps_the_reference_order_in_tiles_of_one_expert() -> None:
    ids = torch.tensor([[1, 3], [3, 0], [1, 0], [3, 1]])
    pair, tile_expert, counts = moe_triton.pad_by_expert(ids, range(0, 4), 4, 4)
    assert counts.tolist() == [2, 3, 0, 3]
    assert pair.tolist() == [3, 5, -1, -1, 0, 4, 7, -1, 1, 2, 6, -1]  # e0 | e1 | e3 (e2 empty)
    assert tile_expert.tolist() == [0, 1, 3]


@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "num_experts", "top_k"),
    [
        (7, 32, 48, range(0, 4), 4, 2),  # every expert, ragged runs, K not a multiple of BLOCK_K
        (19, 64, 32, range(2, 4), 4, 2),  # a rank's half of the experts (expert parallel)
        (1, 32, 32, range(0, 8), 8, 2),  # one decode token: most experts get nothing
        (33, 48, 64, range(0, 4), 4, 1),
    ],
)
def test_grouped_experts_equal_the_torch_reference(
    tokens: int, hidden: int, inter: int, experts: range, num_experts: int, top_k: int
) -> None:
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g)
    probs = torch.softmax(torch.randn(tokens, num_experts, generator=g), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    w_gate_up = torch.randn(len(experts), 2 * inter, hidden, generator=g) / hidden**0.5
    w_down = torch.randn(len(experts), hidden, inter, generator=g) / inter**0.5
    got = moe_triton.experts_forward(
        x, weights, ids, w_gate_up, w_down, experts, num_experts, _silu_mul, block=BLOCK
    )
    expected = _reference(x, weights, ids, w_gate_up, w_down, experts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_loaded_moe_block_gives_the_reference_output_through_the_kernel(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """The GPU path's call as SparseMoeBlock makes it, with a tiny model's routed experts."""
    from scalellm.models.config import ModelConfig
    from scalellm.models.loader import load_model
    from scalellm.models.moe import SparseMoeBlock

    model = tiny_model_factory("qwen3_moe")
    cfg = ModelConfig.from_dir(model)
    block = load_model(model, cfg, torch.float32, torch.device("cpu"), 64).get_submodule("layers.0.mlp")
    assert isinstance(block, SparseMoeBlock)
    x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, ids = block.route(x)
    got = moe_triton.experts_forward(
        x, weights, ids, block.w_gate_up, block.w_down, block.experts, block.moe.num_experts,
        block.ops.silu_mul, block=BLOCK,
    )  # fmt: skip
    torch.testing.assert_close(got, block.reference_experts(x, weights, ids), rtol=1e-4, atol=1e-5)
