"""The flash-attn backend's plumbing on CPU: flash-attn itself is never installed here (no GPU), so
a stand-in module takes its place, implementing the documented semantics of the two functions
the backend calls (paged K/V through an int32 block table, grouped-query heads, the causal mask
aligned bottom-right) and refusing what flash-attn 2 refuses (other index dtypes, pages not a
multiple of 256, a non-contiguous last dimension). What this checks is the backend's side: the
layout it hands over, the int32 tables and cumulative lengths, where outputs land; that the real
kernels honour their documentation is flash-attn's to test, and a GPU's."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import pytest
import torch

from scalellm.engine import attention_flash, attention_triton
from scalellm.engine.attention import (
    AttentionBackend,
    AttentionMetadata,
    PrefillSpan,
    TorchSDPA,
    paged_attention,
    select_backend,
)

PAGE = 256
CPU = torch.device("cpu")
NUM_BLOCKS = 14


def _check_pages(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor
) -> None:
    assert q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only supports fp16 and bf16"
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "(num_blocks, page, nheads_k, headdim)"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "the last dimension must be contiguous"
    if k_cache.shape[1] % PAGE:
        raise RuntimeError("Paged KV cache block size must be divisible by 256")
    assert block_table.dtype == torch.int32 and block_table.dim() == 2, (
        "block_table must be int32 [batch, max]"
    )


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Sq, Hq, D], keys/values [Sk, Hkv, D]; query i sees keys j <= Sk - Sq + i."""
    sq, hq, _ = q.shape
    sk, hkv, _ = keys.shape
    group = hq // hkv
    k = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Sk, D]
    v = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.einsum("qhd,hkd->hqk", q.float(), k) * scale
    visible = torch.arange(sk).unsqueeze(0) <= torch.arange(sq).unsqueeze(1) + (sk - sq)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,hkd->qhd", scores.softmax(-1), v).to(q.dtype)


def _paged(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    return cache[table.long()].flatten(0, 1)[:length]


def _with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> torch.Tensor:
    _check_pages(q, k_cache, v_cache, block_table)
    assert q.dim() == 4 and q.shape[0] == block_table.shape[0], "q (batch, seqlen, nheads, headdim)"
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (q.shape[0],)
    assert causal
    out = torch.empty_like(q)
    for b, length in enumerate(cache_seqlens.tolist()):
        keys, values = _paged(k_cache, block_table[b], length), _paged(v_cache, block_table[b], length)
        out[b] = _attend(q[b], keys, values, softmax_scale)
    return out


def _varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float,
    causal: bool,
    block_table: torch.Tensor,
) -> torch.Tensor:
    _check_pages(q, k, v, block_table)
    assert q.dim() == 3 and q.stride(-1) == 1, "q (total_q, nheads, headdim)"
    for cu in (cu_seqlens_q, cu_seqlens_k):
        assert cu.dtype == torch.int32 and cu.shape == (block_table.shape[0] + 1,) and cu[0] == 0
    assert cu_seqlens_q[-1] == q.shape[0] and causal
    out = torch.empty_like(q)
    for s in range(block_table.shape[0]):
        q0, q1 = cu_seqlens_q[s].item(), cu_seqlens_q[s + 1].item()
        length = int(cu_seqlens_k[s + 1] - cu_seqlens_k[s])
        assert q1 - q0 <= max_seqlen_q and length <= max_seqlen_k
        keys, values = _paged(k, block_table[s], length), _paged(v, block_table[s], length)
        out[q0:q1] = _attend(q[q0:q1], keys, values, softmax_scale)
    return out


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache = _with_kvcache  # type: ignore[attr-defined]
    module.flash_attn_varlen_func = _varlen  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(attention_flash, "AVAILABLE", True)


def _step(
    backend: TorchSDPA | attention_flash.FlashAttnPaged,
    heads: int,
    dtype: torch.dtype,
    device: torch.device = CPU,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Decodes at contexts 3, 300, 600 and chunks on 0, 270 (crossing a page) and 500 cached
    tokens, over scattered pages of 256: (q, new_kv, a layer view of the cache, metadata)."""
    g = torch.Generator().manual_seed(3)
    full = torch.randn(NUM_BLOCKS, 2, 2, PAGE, 2, 16, generator=g).to(dtype).to(device)
    kv = full[:, 1]
    free = iter(torch.randperm(NUM_BLOCKS, generator=g).tolist())
    lens = [3, 300, 600]
    tables = [[next(free) for _ in range(-(-n // PAGE))] for n in lens]
    slots = [(t[(n - 1) // PAGE], (n - 1) % PAGE) for t, n in zip(tables, lens, strict=True)]
    spans, bounds, chunk_tables, row = [], [], [], len(lens)
    for context, n in ((0, 7), (270, 20), (500, 30)):
        table = [next(free) for _ in range(-(-(context + n) // PAGE))]
        slots += [(table[p // PAGE], p % PAGE) for p in range(context, context + n)]
        spans.append(PrefillSpan(row, row + n, context, torch.tensor(table, device=device)))
        bounds.append([row, n, context])
        chunk_tables.append(table + [0] * (3 - len(table)))
        row += n
    q = torch.randn(row, heads, 16, generator=g).to(dtype).to(device)
    new_kv = torch.randn(row, 2, 2, 16, generator=g).to(dtype).to(device)
    blocks, offsets = torch.tensor(slots, device=device).unbind(1)
    meta = AttentionMetadata(
        blocks,
        offsets,
        len(lens),
        torch.tensor([t + [0] * (3 - len(t)) for t in tables], device=device),
        torch.tensor(lens, device=device),
        tuple(spans),
        backend,
        prefill_bounds=torch.tensor(bounds, device=device),
        prefill_tables=torch.tensor(chunk_tables, device=device),
    )
    return q, new_kv, kv, backend.prepare(meta, PAGE)


@pytest.mark.parametrize("heads", [2, 6])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_a_mixed_step_attends_as_torch_sdpa(
    stand_in: None, heads: int, dtype: torch.dtype, tol: float
) -> None:
    """Decodes and prefill chunks through paged_attention, against TorchSDPA: the same cache
    writes, the same output rows (groups of 1 and 3 query heads per K/V head)."""
    outs, caches = [], []
    for backend in (TorchSDPA(), attention_flash.FlashAttnPaged()):
        q, new_kv, kv, meta = _step(backend, heads, dtype)
        outs.append(paged_attention(q, new_kv, kv, meta, 0.25))
        caches.append(kv)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_the_real_flash_attn_on_cuda_attends_as_torch_sdpa(
    engine_device: str, dtype: torch.dtype, tol: float
) -> None:
    """Under SCALELLM_TEST_DEVICE=cuda where flash-attn is really installed (skipped elsewhere,
    the H200 image included): the same mixed step through the real kernels."""
    if engine_device != "cuda" or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("needs CUDA and flash-attn")
    outs = []
    for backend in (TorchSDPA(), attention_flash.FlashAttnPaged()):
        q, new_kv, kv, meta = _step(backend, 6, dtype, torch.device("cuda"))
        outs.append(paged_attention(q, new_kv, kv, meta, 0.25).float().cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)


def test_prepare_hands_flash_attn_int32_tables_and_cumulative_lengths(stand_in: None) -> None:
    backend = attention_flash.FlashAttnPaged()
    _, _, _, meta = _step(backend, 2, torch.bfloat16)
    step = meta.prepared
    assert isinstance(step, attention_flash.FlashStep)
    assert step.decode_lens is not None and step.decode_lens.tolist() == [3, 300, 600]
    assert step.cu_seqlens_q is not None and step.cu_seqlens_q.tolist() == [0, 7, 27, 57]
    assert step.cu_seqlens_k is not None and step.cu_seqlens_k.tolist() == [0, 7, 297, 827]
    assert (step.max_seqlen_q, step.max_seqlen_k) == (30, 530)
    for t in (step.decode_tables, step.prefill_tables, step.decode_lens, step.cu_seqlens_q):
        assert t is not None and t.dtype == torch.int32


def test_a_runner_prefills_in_chunks_and_decodes_as_with_torch_sdpa(stand_in: None) -> None:
    """Where the engine uses it: a tiny random Llama's runner with blocks of 256 prefills a
    prompt whole and another in two chunks, then decodes, through TorchSDPA and again (on a
    zeroed cache) through the flash-attn backend."""
    from scalellm.engine.config import EngineConfig
    from scalellm.engine.model_runner import ModelRunner
    from scalellm.engine.step_inputs import SeqStep
    from scalellm.models.config import ModelConfig
    from scalellm.models.loader import random_model

    cfg = ModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 96, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 97,
         "max_position_embeddings": 1024}
    )  # fmt: skip
    config = EngineConfig(device="cpu", dtype="bfloat16", block_size=PAGE, num_kv_blocks=4)
    runner = ModelRunner(
        config, cfg, 1024, model=random_model(cfg, torch.bfloat16, torch.device("cpu"), 1024)
    )
    a, b = [(3 * j + 1) % 97 for j in range(20)], [(5 * j + 2) % 97 for j in range(300)]
    steps = [
        [SeqStep(0, a, [2], True), SeqStep(0, b[:260], [0, 3], False)],
        [SeqStep(20, [42], [2], True), SeqStep(260, b[260:], [0, 3], True)],
        [SeqStep(21, [7], [2], True), SeqStep(300, [9], [0, 3], True)],
    ]
    logits = []
    for backend in (TorchSDPA(), attention_flash.FlashAttnPaged()):
        runner.kv_cache.zero_()
        runner.attention = backend
        logits += [runner.run_steps(step)[1] for step in steps]
    for expected, got in zip(logits[:3], logits[3:], strict=True):
        assert got is not None and expected is not None
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def _on_cuda(block_size: int, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128) -> AttentionBackend:
    return select_backend(torch.device("cuda"), block_size=block_size, dtype=dtype, head_dim=head_dim)


def test_cuda_takes_flash_attn_only_where_it_runs(
    stand_in: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Selection only (no CUDA call): blocks of 256 in a half type get flash-attn; the default
    16, float32 or a head size it lacks get the Triton kernels (or TorchSDPA without triton),
    and the log says why flash-attn was not used."""
    monkeypatch.delenv("SCALELLM_ATTENTION_TORCH", raising=False)
    assert isinstance(_on_cuda(256), attention_flash.FlashAttnPaged)
    assert isinstance(_on_cuda(512, torch.float16), attention_flash.FlashAttnPaged)
    fallback = attention_triton.TritonPagedDecode if attention_triton.AVAILABLE else TorchSDPA
    for args, reason in (
        ((16,), "block_size is 16"),
        ((256, torch.float32), "float16 and bfloat16 only"),
        ((256, torch.bfloat16, 512), "head sizes up to 256"),
    ):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="scalellm.engine.attention"):
            assert isinstance(_on_cuda(*args), fallback)
        assert "flash-attn is installed but not used" in caplog.text and reason in caplog.text


def test_without_flash_attn_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_flash, "AVAILABLE", False)
    assert attention_flash.why_not(256, torch.bfloat16, 128) == "flash-attn is not installed"
    assert not isinstance(_on_cuda(256), attention_flash.FlashAttnPaged)


def test_the_stand_in_refuses_what_flash_attn_2_refuses(stand_in: None) -> None:
    """The stand-in's checks are live: small pages, int64 tables and float32 are refused."""
    cache = torch.zeros(2, 16, 2, 16, dtype=torch.bfloat16)
    q = torch.zeros(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="divisible by 256"):
        _with_kvcache(
            q, cache, cache, cache_seqlens=torch.tensor([3], dtype=torch.int32),
            block_table=torch.zeros(1, 1, dtype=torch.int32), softmax_scale=1.0, causal=True,
        )  # fmt: skip
    big = torch.zeros(2, PAGE, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="int32"):
        _with_kvcache(
            q, big, big, cache_seqlens=torch.tensor([3], dtype=torch.int32),
            block_table=torch.zeros(1, 1, dtype=torch.long), softmax_scale=1.0, causal=True,
        )  # fmt: skip
    with pytest.raises(AssertionError, match="fp16 and bf16"):
        _with_kvcache(
            q.float(), big.float(), big.float(), cache_seqlens=torch.tensor([3], dtype=torch.int32),
            block_table=torch.zeros(1, 1, dtype=torch.int32), softmax_scale=1.0, causal=True,
        )  # fmt: skip
