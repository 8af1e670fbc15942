"""Weights and the KV cache in memory advised for 2 MB pages (engine/huge_pages.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from scalellm.engine import huge_pages

needs_thp = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here")


def advised(tensor: torch.Tensor) -> bool:
    """Whether the mapping holding the tensor's first byte carries MADV_HUGEPAGE (VmFlags `hg`)."""
    address = tensor.data_ptr()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        start, end = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
        if start <= address < end:
            flags = re.search(r"^VmFlags:(.*)$", block, re.M)
            assert flags is not None
            return "hg" in flags.group(1).split()
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_a_large_tensor_starts_on_a_huge_page_in_advised_memory() -> None:
    t = huge_pages.zeros((3, 1 << 20), torch.float32)
    assert t.shape == (3, 1 << 20) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert advised(t) and advised(t[-1])
    assert not t.any()
    t[2, -1] = 5.0  # the whole tensor is writable: the view ends where its bytes do
    assert t.sum().item() == 5.0


def test_a_small_tensor_is_a_plain_one() -> None:
    t = huge_pages.zeros((7, 9), torch.bfloat16)
    assert t.shape == (7, 9) and t.dtype == torch.bfloat16 and not t.any()


class Holder(nn.Module):
    """Tensors held every way a model of ours holds them, each over 2 MB."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(768, 1024)  # a 3 MB parameter
        self.again = self.linear  # the same module twice (a tied head)
        self.register_buffer("table", torch.randn(1024, 512))
        self.packed = torch.randn(1100, 1000).to(torch.bfloat16)  # a plain attribute (PanelLinear.panels)
        self.small = torch.randn(16)  # stays: under MIN_TENSOR_BYTES
        whole = torch.randn(4000, 256)
        self.head, self.tail = whole[:2000], whole[2000:]  # views of one storage: left where they are


@needs_thp
@pytest.mark.parametrize("arena_bytes", [huge_pages.ARENA_BYTES, 1 << 20])
def test_a_modules_tensors_move_with_their_values(monkeypatch: pytest.MonkeyPatch, arena_bytes: int) -> None:
    monkeypatch.setattr(huge_pages, "ARENA_BYTES", arena_bytes)  # 1 MB: an arena per tensor
    torch.manual_seed(0)
    model = Holder()
    weight = model.linear.weight
    before = {name: getattr(model, name).clone() for name in ("table", "packed", "small", "head", "tail")}
    before["weight"], before["bias"] = weight.detach().clone(), model.linear.bias.detach().clone()
    stay = {name: getattr(model, name).data_ptr() for name in ("small", "head", "tail")}
    x = torch.randn(3, 768)
    expected = model.linear(x)

    moved = huge_pages.move_module(model)

    assert moved == 1024 * 768 * 4 + 1024 * 512 * 4 + 1100 * 1000 * 2
    assert model.linear.weight is weight and isinstance(weight, nn.Parameter)  # the same object
    assert model.again.weight is weight
    for tensor in (weight, model.get_buffer("table"), model.packed):
        assert advised(tensor)
    assert "table" in model._buffers and model._buffers["table"] is model.table
    for name, ptr in stay.items():
        assert getattr(model, name).data_ptr() == ptr
    assert torch.equal(weight, before["weight"]) and torch.equal(model.linear.bias, before["bias"])
    for name in ("table", "packed", "small", "head", "tail"):
        assert torch.equal(getattr(model, name), before[name])
    assert torch.equal(model.linear(x), expected)


def test_a_group_under_a_huge_page_stays_where_it_is() -> None:
    model = nn.Linear(256, 256)
    weight = model.weight.data_ptr()
    assert huge_pages.move_module(model) == 0
    assert model.weight.data_ptr() == weight


@needs_thp
def test_the_engine_loads_its_weights_and_cache_into_advised_memory(tiny_chat_model: Path) -> None:
    from scalellm.engine.config import EngineConfig
    from scalellm.engine.engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(model=str(tiny_chat_model), device="cpu", dtype="float32", num_kv_blocks=512)
    )
    assert engine.kv_cache.numel() * engine.kv_cache.element_size() >= huge_pages.HUGE_PAGE
    assert advised(engine.kv_cache)
    embedding = engine.runner.model.embed_tokens.weight  # the demo's vocabulary: 12.6 MB
    assert advised(embedding)


@needs_thp
def test_weight_bytes_counts_tensors_not_the_arena_they_share() -> None:
    from scalellm.models.quant_linear import weight_bytes

    model = Holder()
    before = weight_bytes(model)
    assert before == (1024 * 768 + 1024) * 4 + 1024 * 512 * 4  # parameters and buffers
    assert huge_pages.move_module(model) > 0
    assert (
        model.linear.weight.untyped_storage().data_ptr()
        == model.get_buffer("table").untyped_storage().data_ptr()
    )
    assert weight_bytes(model) == before
