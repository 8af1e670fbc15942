"""A step of decodes through every layer in one C++ call (models/decode_stack.py): the same bits as
the layer loop, logits and cache, and the layer loop wherever the composite does not apply."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from scalellm.engine import cpu_kernels
from scalellm.engine.config import EngineConfig
from scalellm.engine.kv_quant import quantize_rows
from scalellm.engine.model_runner import ModelRunner
from scalellm.engine.step_inputs import SeqStep
from scalellm.models import loader
from scalellm.models.config import ModelConfig
from scalellm.models.decode_stack import CpuDecodeStack, LinearKind
from scalellm.models.llama import LlamaForCausalLM
from scalellm.models.loader import random_model
from scalellm.models.packed_linear import PackedLinear, PanelLinear, packing_supported, panels_apply
from scalellm.models.quant_linear import W8A8Linear, quantize_weights

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not build here")

BLOCK_SIZE, NUM_BLOCKS, MAX_LEN, VOCAB = 4, 40, 64, 97
CONTEXTS = (1, 5, 17, 8, 3, 12, 9)


def _config(head_dim: int, **extra: object) -> ModelConfig:
    heads = 4
    raw = {"architectures": ["LlamaForCausalLM"], "hidden_size": heads * head_dim, "intermediate_size": 96,
           "num_hidden_layers": 3, "num_attention_heads": heads, "num_key_value_heads": 2,
           "vocab_size": VOCAB, "max_position_embeddings": MAX_LEN}  # fmt: skip
    return ModelConfig.from_dict(raw | extra)


def _runner(cfg: ModelConfig, dtype: torch.dtype, **config: object) -> ModelRunner:
    if not panels_apply(torch.device("cpu"), dtype):
        pytest.skip(f"{dtype} linear layers do not run through the panels on this CPU")
    model = random_model(cfg, dtype, torch.device("cpu"), MAX_LEN)
    return _runner_of(model, cfg, dtype, **config)


def _runner_of(
    model: LlamaForCausalLM, cfg: ModelConfig, dtype: torch.dtype, **config: object
) -> ModelRunner:
    with torch.no_grad():  # random_model zeroes biases: make a dropped bias show
        for module in model.modules():
            if isinstance(module, (PanelLinear, PackedLinear, W8A8Linear)) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
        for name, param in model.named_parameters():  # and a dropped norm weight (all ones there)
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)
    engine = EngineConfig(
        device="cpu", dtype=str(dtype).removeprefix("torch."), block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS
    )
    return ModelRunner(replace(engine, **config), cfg, MAX_LEN, model=model)


def _decodes(rows: int, drafts: int = 0) -> list[SeqStep]:
    """Decodes at CONTEXTS' positions on disjoint blocks; each with ``drafts`` draft tokens."""
    steps, next_id = [], 1
    for i, c in enumerate(CONTEXTS[:rows]):
        n = (c + drafts) // BLOCK_SIZE + 1
        tokens = [(11 * i + k) % VOCAB for k in range(1 + drafts)]
        steps.append(SeqStep(c, tokens, list(range(next_id, next_id + n)), True, drafts))
        next_id += n
    assert next_id <= NUM_BLOCKS
    return steps


def _both_ways(runner: ModelRunner, steps: list[SeqStep]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's logits and cache through the stack, then through the layer loop, from one cache;
    asserts they are the same bits and returns them."""
    model = runner.model
    stack = model.decode_stack
    assert stack is not None
    cache = runner.kv_cache
    if runner.kv_format.quantized:  # int8 rows of random values and their scales
        shape = (*cache.shape[:-1], cache.shape[-1] - 2)
        start = quantize_rows(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    else:
        start = torch.randn(cache.shape, generator=torch.Generator().manual_seed(5)).to(cache.dtype)
    results = []
    for use in (stack, None):
        model.decode_stack = use
        runner.kv_cache.copy_(start)
        _, logits = runner.run_steps(steps)
        assert logits is not None
        results.append((logits, runner.kv_cache.clone()))
    model.decode_stack = stack
    (got, got_cache), (want, want_cache) = results
    assert torch.equal(got, want)
    assert torch.equal(got_cache, want_cache)
    return got, got_cache


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one with each step the stack runs."""
    calls: list[int] = []
    real = CpuDecodeStack.__call__
    monkeypatch.setattr(CpuDecodeStack, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 16])  # the vectorized decode kernel's size, and another
def test_a_step_of_decodes_through_the_stack_equals_the_layer_loop(
    dtype: torch.dtype, head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _runner(_config(head_dim), dtype)
    assert isinstance(runner.model.decode_stack, CpuDecodeStack)
    calls = _count_calls(monkeypatch)
    for rows in (1, 2, 7):
        _, cache = _both_ways(runner, _decodes(rows))
        assert torch.isfinite(cache.float()).all()
    assert len(calls) == 3  # one call a step through the stack (the loop ran the other three)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])  # q/k/v biases; q/k norms
def test_qwen_layers_and_draft_rows_go_through_the_stack_unchanged(
    dtype: torch.dtype, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _runner(_config(64, architectures=[family]), dtype)
    stack = runner.model.decode_stack
    assert stack is not None
    if family == "Qwen2ForCausalLM":
        assert len(stack.qkv_bias) == 3 and not stack.q_norms
    else:
        assert len(stack.q_norms) == len(stack.k_norms) == 3 and not stack.qkv_bias
    calls = _count_calls(monkeypatch)
    logits, _ = _both_ways(runner, _decodes(5, drafts=2))
    assert logits.shape == (15, VOCAB) and len(calls) == 1  # a row for each token and draft


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_linear_layers_go_through_the_stack_unchanged(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the loader packs the weights for oneDNN (bfloat16 on AMX CPUs), the stack calls
    oneDNN's linear op for them, with the same bits as PackedLinear's."""
    if not packing_supported(torch.device("cpu"), dtype):
        pytest.skip(f"oneDNN has no {dtype} linear layers on this CPU")
    monkeypatch.setattr(loader, "panels_apply", lambda device, dtype: False)
    cfg = _config(64, architectures=["Qwen2ForCausalLM"])
    model = random_model(cfg, dtype, torch.device("cpu"), MAX_LEN)
    assert isinstance(model.layers[0].self_attn.qkv_proj, PackedLinear)
    runner = _runner_of(model, cfg, dtype)
    stack = runner.model.decode_stack
    assert isinstance(stack, CpuDecodeStack) and stack.kind == LinearKind.ONEDNN and len(stack.qkv_bias) == 3
    calls = _count_calls(monkeypatch)
    for rows in (1, 7):
        _both_ways(runner, _decodes(rows))
    _both_ways(runner, _decodes(3, drafts=1))
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_layers_go_through_the_stack_unchanged(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--quantization w8a8``: the stack calls the W8A8 kernel with each layer's int8 weights and
    scales, the same bits as W8A8Linear's."""
    kernel = cpu_kernels.w8a8_kernel(torch.device("cpu"), dtype)
    assert kernel is not None
    monkeypatch.setattr(loader, "panels_apply", lambda device, dtype: False)
    monkeypatch.setattr(loader, "packing_supported", lambda device, dtype: False)
    cfg = _config(64, architectures=["Qwen2ForCausalLM"])
    model = random_model(cfg, dtype, torch.device("cpu"), MAX_LEN)  # plain nn.Linear layers
    assert model.decode_stack is None
    quantize_weights(model, "w8a8", kernel)
    stack = CpuDecodeStack.of(model)
    assert stack is not None and stack.kind == LinearKind.W8A8 and len(stack.scales) == 4 * 3
    model.decode_stack = stack
    runner = _runner_of(model, cfg, dtype)
    calls = _count_calls(monkeypatch)
    for rows in (1, 7):
        _both_ways(runner, _decodes(rows))
    _both_ways(runner, _decodes(3, drafts=1))
    assert len(calls) == 3


def test_steps_with_prefill_chunks_run_the_layer_loop() -> None:
    runner = _runner(_config(64), torch.float32)
    stack = runner.model.decode_stack
    assert stack is not None
    prefill = [SeqStep(0, [3, 4, 5, 6, 7], [NUM_BLOCKS - 2, NUM_BLOCKS - 1], True), *_decodes(2)]
    inputs = runner.prepare(prefill)
    assert not stack.takes(len(inputs.input_ids), inputs.meta)
    decodes = runner.prepare(_decodes(3))
    assert stack.takes(len(decodes.input_ids), decodes.meta)
    # bfloat16 layers that hand many rows to oneDNN (AVX-512 without AVX512-BF16) take a few only
    assert not replace(stack, max_rows=2).takes(len(decodes.input_ids), decodes.meta)
    assert replace(stack, max_rows=3).takes(len(decodes.input_ids), decodes.meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_caches_go_through_the_stack_unchanged(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--kv-cache-dtype int8``: the stack's cache writes quantize as the layer loop's do and its
    attention reads the int8 rows as the loop's does: the same logits and cache bytes."""
    runner = _runner(_config(64), dtype, kv_cache_dtype="int8")
    assert runner.kv_cache.dtype == torch.int8 and isinstance(runner.model.decode_stack, CpuDecodeStack)
    calls = _count_calls(monkeypatch)
    for rows in (1, 7):
        _, cache = _both_ways(runner, _decodes(rows))
    _both_ways(runner, _decodes(3, drafts=1))
    assert len(calls) == 3
    scales = cache[..., -2:].contiguous().view(torch.float16)
    assert torch.isfinite(scales).all() and (scales > 0).all()


def _stack_of(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> CpuDecodeStack | None:
    model: LlamaForCausalLM = random_model(cfg, dtype, torch.device("cpu"), MAX_LEN)
    return model.decode_stack  # type: ignore[return-value]


def test_models_the_composite_does_not_compute_get_no_stack() -> None:
    if not panels_apply(torch.device("cpu"), torch.float32):
        pytest.skip("float32 linear layers do not run through the panels on this CPU")
    assert _stack_of(_config(64)) is not None
    moe = _config(64, architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=2)
    assert _stack_of(moe) is None
    assert _stack_of(_config(64), torch.float16) is None  # no panels: torch's linear layers


@pytest.mark.skipif(shutil.which("nm") is None, reason="reads the library's symbols with nm (binutils)")
def test_the_kernels_entry_points_are_not_exported() -> None:
    """csrc/kernels.h declares them hidden: exported, a benchmark loading an older build beside
    this one (bench/decode_kernel.py) would have its ops bound to this library's functions."""
    built = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "/scalellm_cpu_" in line
    }
    assert built, "the kernels' library is not loaded"
    for path in built:
        symbols = subprocess.run(
            ["nm", "-DC", "--defined-only", path], capture_output=True, text=True, check=True
        )
        assert "scalellm::" not in symbols.stdout
