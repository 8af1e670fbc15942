"""The Triton paged-decode backend against TorchSDPA, on CPU through Triton's interpreter
(TRITON_INTERPRET=1) on small shapes; skipped without triton."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scalellm.engine import attention_triton
from scalellm.engine.attention import (
    FORCE_TORCH_ENV,
    AttentionBackend,
    AttentionMetadata,
    PrefillSpan,
    TorchSDPA,
    paged_attention,
    select_backend,
)

pytestmark = pytest.mark.skipif(not attention_triton.AVAILABLE, reason="triton is not installed")

BLOCK_SIZE, NUM_BLOCKS, LAYERS = 4, 16, 2
CONTEXTS = (1, 5, 17)
# Scattered, out of order, and none of them block 0 (the tables' padding value).
TABLES = ([9], [3, 14], [12, 2, 7, 15, 5])


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _cache(num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Layer 1 of an engine-shaped cache: a strided view, as the model hands it to attention."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(NUM_BLOCKS, LAYERS, 2, BLOCK_SIZE, num_kv_heads, head_dim, generator=g)
    return full.to(dtype)[:, 1]


def _tables() -> torch.Tensor:
    width = max(len(t) for t in TABLES)
    return torch.tensor([t + [0] * (width - len(t)) for t in TABLES])


def _decode_meta(backend: AttentionBackend) -> AttentionMetadata:
    """Three decodes, their new tokens' slots at positions CONTEXTS - 1."""
    lens = torch.tensor(CONTEXTS)
    slot_blocks = torch.tensor([t[(n - 1) // BLOCK_SIZE] for t, n in zip(TABLES, CONTEXTS, strict=True)])
    return AttentionMetadata.decodes(slot_blocks, (lens - 1) % BLOCK_SIZE, _tables(), lens, backend)


@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_decode_equals_torch_sdpa_over_scattered_blocks(
    head_dim: int, dtype: torch.dtype, tol: float
) -> None:
    kv = _cache(2, head_dim, dtype)
    q = torch.randn(3, 4, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = head_dim**-0.5
    triton_backend = attention_triton.TritonPagedDecode(block_n=16)
    got = triton_backend.decode(q, kv, _decode_meta(triton_backend), scale)
    sdpa = TorchSDPA()
    expected = sdpa.decode(q, kv, sdpa.prepare(_decode_meta(sdpa), BLOCK_SIZE), scale)
    assert got.dtype == dtype and got.shape == (3, 4, head_dim)
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def test_context_longer_than_one_tile_and_a_group_of_one() -> None:
    """17 tokens over tiles of 16 (the online softmax rescales across tiles); Hq == Hkv."""
    kv = _cache(4, 16, torch.float32, seed=2)
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(3))
    got = attention_triton.paged_decode(q, kv, _tables(), torch.tensor(CONTEXTS), 0.25, block_n=16)
    sdpa = TorchSDPA()
    expected = sdpa.decode(q, kv, sdpa.prepare(_decode_meta(sdpa), BLOCK_SIZE), 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_mixed_step_writes_the_cache_and_attends_as_torch_sdpa() -> None:
    """paged_attention with three decodes and a prefill chunk on top of cached context."""
    g = torch.Generator().manual_seed(4)
    chunk_table = torch.tensor([1, 6, 10])  # 6 cached tokens + a chunk of 4
    outs, caches = [], []
    for backend in (TorchSDPA(), attention_triton.TritonPagedDecode(block_n=16)):
        kv = _cache(2, 16, torch.float32, seed=5)
        g.manual_seed(4)
        q = torch.randn(7, 4, 16, generator=g)
        new_kv = torch.randn(7, 2, 2, 16, generator=g)
        decode = _decode_meta(backend)
        chunk_slots = [6, 7, 8, 9]
        meta = AttentionMetadata(
            torch.cat([decode.slot_blocks, chunk_table[torch.tensor(chunk_slots) // BLOCK_SIZE]]),
            torch.cat([decode.slot_offsets, torch.tensor(chunk_slots) % BLOCK_SIZE]),
            3,
            decode.decode_block_tables,
            decode.decode_context_lens,
            (PrefillSpan(3, 7, 6, chunk_table),),
            backend,
        )
        outs.append(paged_attention(q, new_kv, kv, backend.prepare(meta, BLOCK_SIZE), 0.25))
        caches.append(kv)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_cuda_gets_the_triton_backend_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Selection only: no CUDA call is made in choosing."""
    monkeypatch.delenv(FORCE_TORCH_ENV, raising=False)
    assert isinstance(select_backend(torch.device("cuda")), attention_triton.TritonPagedDecode)
    monkeypatch.setenv(FORCE_TORCH_ENV, "1")
    assert isinstance(select_backend(torch.device("cuda")), TorchSDPA)


def test_a_model_decodes_the_same_logits_through_the_triton_backend() -> None:
    """The backend where the engine uses it: a tiny random Llama's runner, three prompts
    prefilled, then one decode step through TorchSDPA and again through the Triton kernel."""
    from scalellm.engine.config import EngineConfig
    from scalellm.engine.model_runner import ModelRunner, SeqStep
    from scalellm.models.config import ModelConfig
    from scalellm.models.loader import random_model

    cfg = ModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
         "max_position_embeddings": 64}
    )  # fmt: skip
    config = EngineConfig(device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS)
    runner = ModelRunner(config, cfg, 64, model=random_model(cfg, torch.float32, torch.device("cpu"), 64))
    prompts = [[(7 * i + j) % 97 for j in range(n - 1)] for i, n in enumerate(CONTEXTS) if n > 1]
    runner.run_steps([SeqStep(0, p, t, True) for p, t in zip(prompts, TABLES[1:], strict=True)])
    decode = [SeqStep(n - 1, [5 + n], t, True) for n, t in zip(CONTEXTS, TABLES, strict=True)]
    runner.attention = TorchSDPA()
    _, expected = runner.run_steps(decode)
    runner.attention = attention_triton.TritonPagedDecode(block_n=16)
    _, got = runner.run_steps(decode)
    assert got is not None and expected is not None
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _cuda_compiler() -> bool:
    """Triton's NVIDIA backend and its bundled ptxas: compiling needs no GPU."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _cuda_compiler(), reason="triton has no NVIDIA backend here")
@pytest.mark.parametrize(("dtype", "block_n"), [("bf16", 64), ("fp32", 32)])
def test_the_kernel_compiles_for_an_h100_class_gpu(
    dtype: str, block_n: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the interpreter does not check: the kernel lowers to a cubin for sm_90 (tl.dot shapes
    and dtypes, the loop-carried types) with the shapes of an 8B Llama (G 4, D 128, blocks of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compiled here, not found in a cache
    strides = ["stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_tb"]
    strides += ["stride_kb", "stride_kv", "stride_ks", "stride_kh"]
    signature = {"out_ptr": f"*{dtype}", "q_ptr": f"*{dtype}", "kv_ptr": f"*{dtype}"}
    signature |= {"table_ptr": "*i64", "lens_ptr": "*i64", "scale": "fp32"} | dict.fromkeys(strides, "i32")
    constants = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_G": 16, "BLOCK_D": 128}
    constants |= {"BLOCK_N": block_n, "UPCAST_DOT": False}
    signature |= dict.fromkeys(constants, "constexpr")
    source = ASTSource(attention_triton._kernel(), signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
    assert compiled.metadata.shared <= 48 * 1024  # fits without the opt-in to larger shared memory


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_the_compiled_kernel_on_cuda_equals_torch_sdpa_at_an_8b_shape(
    engine_device: str, dtype: torch.dtype, tol: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under SCALELLM_TEST_DEVICE=cuda (skipped elsewhere): the kernel as the GPU runs it (tensor
    cores for half types, 64-token tiles; 32 for float32), G 4, D 128, blocks of 16, contexts
    within one tile, across many and not a tile's multiple, over scattered blocks."""
    if engine_device != "cuda":
        pytest.skip("runs under SCALELLM_TEST_DEVICE=cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    device, block, heads, kv_heads, dim = torch.device("cuda"), 16, 32, 8, 128
    contexts = [1, 63, 700, 129, 2048]
    g = torch.Generator().manual_seed(7)
    widths = [-(-n // block) for n in contexts]
    order = torch.randperm(1 + sum(widths), generator=g)
    ids = [i for i in order.tolist() if i != 0]
    tables, start = [], 0
    for w in widths:
        tables.append(ids[start : start + w] + [0] * (max(widths) - w))
        start += w
    full = torch.randn(1 + sum(widths), 2, 2, block, kv_heads, dim, generator=g).to(dtype)
    kv = full.to(device)[:, 1]  # a strided layer view
    q = torch.randn(len(contexts), heads, dim, generator=g).to(dtype).to(device)
    lens = torch.tensor(contexts, device=device)
    table = torch.tensor(tables, device=device)
    backend = attention_triton.TritonPagedDecode()
    meta = AttentionMetadata.decodes(lens * 0, lens * 0, table, lens, backend)
    got = backend.decode(q, kv, meta, dim**-0.5)
    sdpa = TorchSDPA()
    expected = sdpa.decode(q.float(), kv.float(), sdpa.prepare(meta, block), dim**-0.5)
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_puts_each_token_in_its_slot_as_indexing_does(
    engine_device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the fused qkv buffer (K/V rows a strided view of it) into a layer view of the cache,
    as the model hands them over; everything else in the cache untouched. Interpreted on CPU,
    compiled under SCALELLM_TEST_DEVICE=cuda."""
    if engine_device == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET")
    device, hq, hkv, dim, tokens = torch.device(engine_device), 4, 2, 16, 5
    g = torch.Generator().manual_seed(9)
    full = torch.randn(NUM_BLOCKS, LAYERS, 2, BLOCK_SIZE, hkv, dim, generator=g).to(dtype).to(device)
    qkv = torch.randn(tokens, hq + 2 * hkv, dim, generator=g).to(dtype).to(device)
    new_kv = qkv[:, hq:].unflatten(1, (2, hkv))
    blocks = torch.tensor([9, 3, 3, 12, 15], device=device)
    offsets = torch.tensor([0, 1, 3, 2, 0], device=device)
    expected = full.clone()
    expected[:, 1][blocks, :, offsets] = new_kv
    attention_triton.write_kv(full[:, 1], new_kv, blocks, offsets)
    torch.testing.assert_close(full, expected, rtol=0, atol=0)
