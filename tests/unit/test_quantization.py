"""Model compression: int8 weights (models/quant_linear.py) and an int8 KV cache
(engine/kv_quant.py) against their dequantized references, the engine end to end with both, and
the settings' validation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scalellm.engine import cpu_kernels
from scalellm.engine.attention import AttentionMetadata, PrefillSpan, _decode, sdpa
from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.kv_quant import Int8KVSDPA, KVCacheFormat, dequantize_rows, quantize_rows
from scalellm.models.quant_fp8 import Fp8Linear, quantize_fp8_rows, quantize_fp8_weight
from scalellm.models.quant_linear import (
    ACT_GROUP,
    GEMV_ROWS,
    Int8Linear,
    PackedEmbedding,
    QuantEmbedding,
    W8A8Kernel,
    W8A8Linear,
    dequantize,
    pack_w8a8,
    quantize_int8,
    quantize_per_channel,
    quantize_w8a8,
    unpack_rows,
    weight_bytes,
)
from scalellm.transfer import KVLayout, LayoutMismatchError
from scalellm.types import SamplingParams


def _weight(out: int, inp: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * torch.rand(out, 1, generator=gen)  # rows of unequal range
    w[3] = 0.0  # an all-zero row must not divide by zero
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_channel_round_trip_is_within_half_a_step(dtype: torch.dtype) -> None:
    w = _weight(40, 24, 0).to(dtype)
    q, s = quantize_per_channel(w, dtype)
    assert q.dtype == torch.int8 and s.dtype == dtype and s.shape == (40,)
    assert int(q.abs().max()) == 127  # each nonzero row spans the whole int8 range
    assert torch.all(q[3] == 0)
    err = (dequantize(q, s, torch.float32) - w.float()).abs()
    assert torch.all(err <= s.float().unsqueeze(1) / 2 * (1 + 1e-3) + 1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, GEMV_ROWS, GEMV_ROWS + 1, 64])  # both kernels
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_f_linear_over_the_dequantized_weight(
    dtype: torch.dtype, rows: int, bias: bool
) -> None:
    """Within the output dtype's rounding: 1e-4 relative in float32, 5e-3 in bfloat16 (two roundings)."""
    linear = torch.nn.Linear(96, 80, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_weight(80, 96, 1))
    linear = linear.to(dtype)
    int8 = Int8Linear.from_linear(linear)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).to(dtype)
    reference = F.linear(x.float(), dequantize(int8.qweight, int8.scales, torch.float32))
    if bias:
        reference += linear.bias.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-3
    got = int8(x.unsqueeze(0)).squeeze(0)
    assert got.dtype == dtype and got.shape == (rows, 80)
    torch.testing.assert_close(got.float(), reference, atol=tol * reference.abs().max().item(), rtol=tol)


def _w8a8_kernel(dtype: torch.dtype, path: str | None = None) -> W8A8Kernel:
    from scalellm.engine.cpu_kernels import CpuW8A8, w8a8_kernel, w8a8_paths

    kernel = w8a8_kernel(torch.device("cpu"), dtype)
    if kernel is None:
        pytest.skip("the CPU kernels did not build here")
    if path is not None and path not in w8a8_paths():
        pytest.skip(f"this build has no {path} path of w8a8_linear (not this CPU's ISA)")
    return kernel if path is None else CpuW8A8(path)


def test_pack_w8a8_keeps_every_row_readable() -> None:
    """The packed layout pads N to 16 and K to 4; unpack_rows reads any row back exactly."""
    q = torch.randint(-127, 128, (35, 9), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_w8a8(q)
    assert packed.shape == (3, 3, 16, 4)
    row_21_k_8_to_11 = torch.tensor([q[21, 8], 0, 0, 0], dtype=torch.int8)
    assert torch.equal(packed[1, 2, 5], row_21_k_8_to_11)
    rows = torch.tensor([0, 15, 16, 34, 7])
    assert torch.equal(unpack_rows(packed, rows, 9), q[rows])


W8A8_PATHS = [None, *cpu_kernels.W8A8_PATHS]  # None: the default, the best the build has


@pytest.mark.parametrize("path", W8A8_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 37, 64])  # register tiles (4, 6, 12, 16 rows) and the rest
@pytest.mark.parametrize(
    ("out_features", "in_features"), [(80, 160), (35, 77), (40, 192), (24, 2048)]
)  # 2.5 groups; padded N, K; whole groups (AMX); 32 groups
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_linear_equals_its_definition(
    path: str | None, dtype: torch.dtype, rows: int, out_features: int, in_features: int, bias: bool
) -> None:
    """csrc/quant_ops.cpp's w8a8_linear computes sum_g (round(x_g / a_g) . q_g) * a_g * s + b
    over groups g of ACT_GROUP input channels, a_g = max|x_g| / 127 per row, each group's dot
    product exact in int32, up to float32 rounding; on every path the build has."""
    kernel = _w8a8_kernel(dtype, path)
    gen = torch.Generator().manual_seed(rows)
    q, s = quantize_per_channel(_weight(out_features, in_features, 2).to(dtype), dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    x = (torch.randn(rows, in_features, generator=gen) * 3).to(dtype)
    x[0, 7] = 40.0  # an outlier channel sets its row's scale
    xm = x.float()
    reference = torch.zeros(rows, out_features, dtype=torch.float64)
    for g in range(0, in_features, ACT_GROUP):
        xg = xm[:, g : g + ACT_GROUP]
        a = xg.abs().amax(dim=1, keepdim=True) / 127
        xq = torch.round(xg / a).clamp(-127, 127)
        reference += (xq.double() @ q[:, g : g + ACT_GROUP].double().t()) * a.double()
    reference *= s.double()
    if b is not None:
        reference += b.double()
    layer = W8A8Linear(pack_w8a8(q), s, b, in_features, kernel)
    got = layer(x.unsqueeze(0)).squeeze(0)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), reference, atol=tol * reference.abs().max().item(), rtol=tol)
    # Per row: a row's result does not depend on the other rows of the batch.
    torch.testing.assert_close(layer(x[-1:]), got[-1:], atol=0, rtol=0)


@pytest.mark.parametrize("rows", [3, 37, 64])
def test_w8a8_paths_return_the_same_bits(rows: int) -> None:
    """Every path sums the same exact int32 group dot products with the same float32 operations
    in the same order, so a model's output does not depend on the CPU's instruction set; extreme
    activations (+-127 after quantization everywhere) check that no path saturates."""
    from scalellm.engine.cpu_kernels import w8a8_paths

    _w8a8_kernel(torch.float32)
    paths = w8a8_paths()
    gen = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (50, 256), dtype=torch.int8, generator=gen)
    q[:16, :64] = -127
    q[16:32, :64] = 127
    s = torch.rand(50, generator=gen) + 0.5
    x = torch.randn(rows, 256, generator=gen)
    x[0, :64] = -1.0  # every value of the group quantizes to -127: products of +-127 * 127 only
    x[-1, 64:128] = 1.0
    packed = pack_w8a8(q)
    outs = {path: _w8a8_kernel(torch.float32, path)(x, packed, s, None) for path in paths}
    for path in paths:
        assert torch.equal(outs[path], outs[paths[0]]), (path, paths[0])


def test_w8a8_ties_embedding_and_lm_head_to_one_packed_copy() -> None:
    kernel = _w8a8_kernel(torch.float32)
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(50, 16),
            "head": torch.nn.Linear(16, 50, bias=False),
            "proj": torch.nn.Linear(16, 24),
        }
    )
    model["head"].weight = model["embed"].weight  # type: ignore[union-attr]
    full = model["embed"].weight.detach().clone()  # type: ignore[union-attr]
    assert quantize_w8a8(model, kernel) == 2
    embed, head, proj = model["embed"], model["head"], model["proj"]
    assert (
        isinstance(embed, PackedEmbedding) and isinstance(head, W8A8Linear) and isinstance(proj, W8A8Linear)
    )
    assert embed.packed.data_ptr() == head.packed.data_ptr() and proj.bias is not None
    assert weight_bytes(model) == 64 * 16 + 50 * 4 + 32 * 16 + 24 * 4 * 2  # padded to 16 rows
    ids = torch.tensor([[0, 7], [49, 17]])
    step = full.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((embed(ids) - full[ids]).abs() <= step[ids] / 2 + 1e-6)


def test_a_tied_embedding_and_lm_head_share_one_int8_copy() -> None:
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(50, 16), "head": torch.nn.Linear(16, 50, bias=False)}
    )
    model["head"].weight = model["embed"].weight  # type: ignore[union-attr]
    full = model["embed"].weight.detach().clone()  # type: ignore[union-attr]
    before = weight_bytes(model)
    assert quantize_int8(model) == 1
    embed, head = model["embed"], model["head"]
    assert isinstance(embed, QuantEmbedding) and isinstance(head, Int8Linear)
    assert embed.qweight.data_ptr() == head.qweight.data_ptr()
    assert weight_bytes(model) == 50 * 16 + 50 * 4  # int8 values + a float32 scale per row
    assert before == 50 * 16 * 4
    ids = torch.tensor([[0, 7], [49, 7]])
    step = full.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((embed(ids) - full[ids]).abs() <= step[ids] / 2 + 1e-6)


@pytest.mark.parametrize("rows", [1, 33])
def test_fp8_linear_equals_the_dequantized_product(rows: int) -> None:
    """torch's CPU _scaled_mm stands in for the GPU's: per-token activation and per-channel weight
    scales applied to the fp8 product, up to bfloat16 output rounding."""
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(_weight(48, 64, 5))
    fp8 = Fp8Linear(*quantize_fp8_weight(linear.weight), linear.bias.detach())
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    xq, xs = quantize_fp8_rows(x)
    w = fp8.qweight.float() * fp8.scales.reshape(-1, 1)
    reference = (xq.float() * xs) @ w.T + linear.bias.float()
    got = fp8(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference, atol=2e-2 * reference.abs().max().item(), rtol=2e-2)
    exact = F.linear(x.float(), linear.weight.float(), linear.bias.float())  # fp8 keeps ~2 significant digits
    assert (got.float() - exact).abs().max() < 0.1 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_rows_round_trip_and_layout(dtype: torch.dtype) -> None:
    x = (torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    x[1, 2] = 0.0
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, 66)
    scale = rows[..., 64:].view(torch.float16).float()  # the last two bytes of each row
    expected = (x.float().abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float16).tiny)
    torch.testing.assert_close(scale, expected, rtol=1e-3, atol=0)  # a zero row: the smallest scale
    back = dequantize_rows(rows, torch.float32)
    assert torch.all((back - x.float()).abs() <= scale / 2 * (1 + 1e-3) + 1e-6)
    assert torch.all(back[1, 2] == 0)


def test_kv_cache_format_halves_the_bytes_of_a_bfloat16_cache() -> None:
    auto = KVCacheFormat.resolve("auto", torch.bfloat16, 64)
    int8 = KVCacheFormat.resolve("int8", torch.bfloat16, 64)
    assert (auto.dtype, auto.row_bytes, auto.quantized) == (torch.bfloat16, 128, False)
    assert (int8.dtype, int8.row_bytes, int8.quantized) == (torch.int8, 66, True)


def _int8_cache(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 layer cache [blocks, 2, block_size, Hkv, D + 2] and its float32 dequantization."""
    full = torch.randn(12, 3, 2, 4, 2, 32, generator=gen)
    cache = quantize_rows(full)[:, 1]  # the strided view of one layer, as the model passes it
    return cache, dequantize_rows(cache, torch.float32)


def test_int8_decode_equals_sdpa_over_the_dequantized_cache() -> None:
    gen = torch.Generator().manual_seed(3)
    cache, reference = _int8_cache(gen)
    tables = torch.tensor([[3, 7, 1, 0], [11, 2, 0, 0], [5, 9, 4, 8]])
    context = torch.tensor([13, 1, 16])
    q = torch.randn(3, 6, 32, generator=gen)
    backend = Int8KVSDPA(torch.float32)
    meta = AttentionMetadata.decodes(
        torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), tables, context, backend
    )
    meta = backend.prepare(meta, 4)
    assert meta.decode_mask is not None
    expected = _decode(q, reference[:, 0], reference[:, 1], tables, meta.decode_mask, 0.2)
    torch.testing.assert_close(backend.decode(q, cache, meta, 0.2), expected, atol=1e-5, rtol=1e-5)


def test_int8_prefill_chunk_reads_its_context_and_itself_as_stored() -> None:
    gen = torch.Generator().manual_seed(4)
    cache, reference = _int8_cache(gen)
    table = torch.tensor([6, 2, 9])  # 5 tokens of context, then a chunk of 4
    q = torch.randn(4, 6, 32, generator=gen)
    new_kv = torch.randn(4, 2, 2, 32, generator=gen)
    span = PrefillSpan(0, 4, 5, table)
    got = Int8KVSDPA(torch.float32).prefill_span(q, new_kv, cache, span, 0.2)
    context = reference.index_select(0, table).transpose(0, 1).reshape(2, 12, 2, 32)[:, :5]
    stored = dequantize_rows(quantize_rows(new_kv), torch.float32)
    assert not torch.equal(stored, new_kv)  # the round trip is visible
    keys = torch.cat((context[0], stored[:, 0])).transpose(0, 1).unsqueeze(0)
    values = torch.cat((context[1], stored[:, 1])).transpose(0, 1).unsqueeze(0)
    mask = torch.arange(9).unsqueeze(0) <= torch.arange(4).unsqueeze(1) + 5
    expected = sdpa(q.transpose(0, 1).unsqueeze(0), keys, values, 0.2, mask=mask).squeeze(0).transpose(0, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_an_int8_cache_layout_is_refused_by_a_bfloat16_peer() -> None:
    bf16 = KVLayout.from_kv_cache(torch.zeros(2, 3, 2, 4, 2, 32, dtype=torch.bfloat16), "m")
    int8 = KVLayout.from_kv_cache(torch.zeros(2, 3, 2, 4, 2, 34, dtype=torch.int8), "m")
    assert int8.block_bytes == 3 * 2 * 4 * 2 * 34
    with pytest.raises(LayoutMismatchError, match=r"dtype.*head_dim"):
        bf16.check_compatible(int8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantization": "int4"}, "quantization must be one of"),
        ({"kv_cache_dtype": "fp16"}, "kv_cache_dtype must be one of"),
        ({"quantization": "fp8", "device": "cpu"}, "fp8 needs a CUDA GPU"),
        ({"quantization": "w8a8", "device": "cuda"}, "w8a8 runs on CPU"),
    ],
)
def test_compression_settings_are_validated(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **kwargs)


def test_cli_choices_are_the_engine_s() -> None:
    from scalellm import cli
    from scalellm.engine import config

    assert cli.QUANTIZATIONS == config.QUANTIZATIONS and cli.KV_CACHE_DTYPES == config.KV_CACHE_DTYPES


def _greedy(model: Path, prompts: list[list[int]], **kwargs: object) -> tuple[list[list[int]], list[int]]:
    """Greedy outputs under a small cache and budget (chunked prefill, preemption), no leaks."""
    engine = LLMEngine(
        EngineConfig(
            model=str(model),
            dtype="float32",
            block_size=4,
            max_num_batched_tokens=48,
            max_num_seqs=6,
            **kwargs,  # type: ignore[arg-type]
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reqs = [engine.add_request(str(i), p, params) for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
    assert engine.num_free_blocks == engine.blocks.num_blocks, "blocks leaked"
    return [r.output_token_ids for r in reqs], [r.num_preemptions for r in reqs]


@pytest.mark.parametrize(
    ("quantization", "kv"), [("int8", "auto"), ("w8a8", "auto"), ("none", "int8"), ("int8", "int8")]
)
def test_engine_runs_quantized_end_to_end_and_preemption_changes_nothing(
    tiny_llama: Path, quantization: str, kv: str
) -> None:
    """A quantized engine is deterministic through chunked prefill and preemption (a tight cache
    recomputes some requests), and stays close to the unquantized model's greedy output."""
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(20, 70))] for _ in range(8)]
    roomy, roomy_preempted = _greedy(
        tiny_llama, prompts, num_kv_blocks=400, quantization=quantization, kv_cache_dtype=kv
    )
    tight, tight_preempted = _greedy(
        tiny_llama, prompts, num_kv_blocks=40, quantization=quantization, kv_cache_dtype=kv
    )
    assert sum(roomy_preempted) == 0 and sum(tight_preempted) > 0
    assert tight == roomy
    plain, _ = _greedy(tiny_llama, prompts, num_kv_blocks=400)
    first_tokens = sum(a[0] == b[0] for a, b in zip(roomy, plain, strict=True))
    assert first_tokens >= 6, (roomy, plain)


@pytest.mark.slow
def test_demo_model_answers_sensibly_with_int8_weights_and_cache(demo_model_dir: Path) -> None:
    from scalellm import LLM

    llm = LLM(model=str(demo_model_dir), quantization="int8", kv_cache_dtype="int8", kv_cache_gb=0.1)
    chat = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    out = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=16))[0].outputs[0]
    assert "Paris" in out.text


def test_w8a8_amx_and_onednn_take_turns_with_the_tiles() -> None:
    """The AMX path loads its tile config on every call and does not release the tiles; oneDNN's
    bfloat16 kernels (PackedLinear, AMX here) configure their own: neither may see the other's."""
    from scalellm.engine.cpu_kernels import w8a8_paths
    from scalellm.models.packed_linear import PackedLinear, packing_supported

    _w8a8_kernel(torch.float32)
    if "amx" not in w8a8_paths() or not packing_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no AMX path, or no oneDNN bfloat16 here")
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (96, 128), dtype=torch.int8, generator=gen)
    s = torch.rand(96, generator=gen)
    x = torch.randn(32, 128, generator=gen)
    packed, amx, vnni = pack_w8a8(q), _w8a8_kernel(torch.float32, "amx"), _w8a8_kernel(torch.float32, "vnni")
    linear = torch.nn.Linear(128, 80, bias=False).to(torch.bfloat16)
    onednn = PackedLinear(linear)
    xb = x.to(torch.bfloat16)
    reference = F.linear(xb.float(), linear.weight.float())
    expected = vnni(x, packed, s, None)
    for _ in range(3):
        assert torch.equal(amx(x, packed, s, None), expected)
        torch.testing.assert_close(onednn(xb).float(), reference, atol=0.05, rtol=0.02)
