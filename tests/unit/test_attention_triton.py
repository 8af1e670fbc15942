"""The Triton paged-decode backend against TorchSDPA, on CPU through Triton's interpreter
(TRITON_INTERPRET=1) on small shapes; skipped without triton."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scalellm.engine import attention, attention_triton
from scalellm.engine.attention import (
    FORCE_TORCH_ENV,
    AttentionBackend,
    AttentionMetadata,
    PrefillSpan,
    TorchSDPA,
    paged_attention,
    select_backend,
)
from scalellm.engine.model_runner import ModelRunner
from scalellm.engine.step_inputs import SeqStep

pytestmark = pytest.mark.skipif(not attention_triton.AVAILABLE, reason="triton is not installed")

BLOCK_SIZE, NUM_BLOCKS, LAYERS = 4, 16, 2
CONTEXTS = (1, 5, 17)
# Scattered, out of order, and none of them block 0 (the tables' padding value).
TABLES = ([9], [3, 14], [12, 2, 7, 15, 5])


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _cache(
    num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0, num_blocks: int = NUM_BLOCKS
) -> torch.Tensor:
    """Layer 1 of an engine-shaped cache: a strided view, as the model hands it to attention."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(num_blocks, LAYERS, 2, BLOCK_SIZE, num_kv_heads, head_dim, generator=g)
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
            prefill_bounds=torch.tensor([[3, 4, 6]]),
            prefill_tables=chunk_table.unsqueeze(0),
        )
        outs.append(paged_attention(q, new_kv, kv, backend.prepare(meta, BLOCK_SIZE), 0.25))
        caches.append(kv)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# Prefill chunks as (context_len, length): a fresh prompt, chunks on cached context (one ending
# mid-block, one longer than a query tile and crossing key tiles), a two-token prompt.
CHUNKS = ((0, 7), (6, 5), (13, 20), (0, 2))


def _prefill_step(
    backend: AttentionBackend, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step of two decodes then CHUNKS over scattered blocks of a seeded cache: (q, new_kv, kv,
    meta), the metadata as ModelRunner.prepare lays it out (bounds and padded tables too)."""
    g = torch.Generator().manual_seed(11)
    kv = _cache(num_kv_heads, head_dim, dtype, seed=12, num_blocks=24)
    free = iter(torch.randperm(24, generator=g).tolist())
    decode_tables = [[next(free)], [next(free), next(free)]]  # contexts 3 and 6
    decode_lens = [3, 6]
    slot_blocks = [t[(n - 1) // BLOCK_SIZE] for t, n in zip(decode_tables, decode_lens, strict=True)]
    slot_offsets = [(n - 1) % BLOCK_SIZE for n in decode_lens]
    spans, bounds, tables = [], [], []
    row = len(decode_lens)
    for context, n in CHUNKS:
        table = [next(free) for _ in range(-(-(context + n) // BLOCK_SIZE))]
        slot_blocks += [table[p // BLOCK_SIZE] for p in range(context, context + n)]
        slot_offsets += [p % BLOCK_SIZE for p in range(context, context + n)]
        spans.append(PrefillSpan(row, row + n, context, torch.tensor(table)))
        bounds.append([row, n, context])
        tables.append(table)
        row += n
    width = max(map(len, tables))
    q = torch.randn(row, num_heads, head_dim, generator=g).to(dtype)
    new_kv = torch.randn(row, 2, num_kv_heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata(
        torch.tensor(slot_blocks),
        torch.tensor(slot_offsets),
        len(decode_lens),
        torch.tensor([t + [0] * (2 - len(t)) for t in decode_tables]),
        torch.tensor(decode_lens),
        tuple(spans),
        backend,
        prefill_bounds=torch.tensor(bounds),
        prefill_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
    )
    return q, new_kv, kv, backend.prepare(meta, BLOCK_SIZE)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (6, 2), (2, 2)])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_varlen_prefill_equals_torch_sdpa_chunk_by_chunk(
    num_heads: int, num_kv_heads: int, dtype: torch.dtype, tol: float
) -> None:
    """A mixed step through paged_attention: the Triton backend's one prefill launch against
    TorchSDPA's chunk-at-a-time SDPA, groups of 2, 3 (not a power of two: 5 tokens of 3 heads
    in a 16-row tile) and 1, tiles of 16 rows and 16 keys so chunks span several of each."""
    outs, caches = [], []
    for backend in (TorchSDPA(), attention_triton.TritonPagedDecode(block_n=16, block_r=16)):
        q, new_kv, kv, meta = _prefill_step(backend, num_heads, num_kv_heads, 16, dtype)
        outs.append(paged_attention(q, new_kv, kv, meta, 0.3))
        caches.append(kv)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0)
    assert outs[1].dtype == dtype
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=tol, atol=tol)


def test_varlen_prefill_writes_only_its_chunks_rows() -> None:
    """The kernel fills the rows of the chunks and nothing else of ``out`` (decode rows are the
    decode kernel's), with the default tiles (one tile holds every chunk here)."""
    q, new_kv, kv, meta = _prefill_step(attention_triton.TritonPagedDecode(), 4, 2, 16, torch.float32)
    attention_triton.write_kv(kv, new_kv, meta.slot_blocks, meta.slot_offsets)
    out = torch.full_like(q, 7.0)
    assert meta.prefill_tables is not None and meta.prefill_bounds is not None
    attention_triton.paged_prefill(q, kv, meta.prefill_tables, meta.prefill_bounds, 20, 0.3, out)
    nd = meta.num_decode_tokens
    assert torch.equal(out[:nd], torch.full_like(out[:nd], 7.0))
    expected = torch.empty_like(q)
    TorchSDPA().prefill(q, new_kv, kv, meta, 0.3, expected)
    torch.testing.assert_close(out[nd:], expected[nd:], rtol=1e-5, atol=1e-5)


def test_cuda_gets_the_triton_backend_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Selection only: no CUDA call is made in choosing."""
    monkeypatch.delenv(FORCE_TORCH_ENV, raising=False)
    assert isinstance(
        select_backend(torch.device("cuda"), block_size=16, dtype=torch.bfloat16, head_dim=128),
        attention_triton.TritonPagedDecode,
    )
    monkeypatch.setenv(FORCE_TORCH_ENV, "1")
    assert isinstance(
        select_backend(torch.device("cuda"), block_size=16, dtype=torch.bfloat16, head_dim=128), TorchSDPA
    )


def _tiny_runner(num_heads: int) -> ModelRunner:
    """A float32 CPU runner of a random two-layer Llama with 2 K/V heads of 16 dimensions."""
    from scalellm.engine.config import EngineConfig
    from scalellm.models.config import ModelConfig
    from scalellm.models.loader import random_model

    cfg = ModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 16 * num_heads, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": num_heads, "num_key_value_heads": 2,
         "vocab_size": 97, "max_position_embeddings": 64}
    )  # fmt: skip
    config = EngineConfig(device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS)
    return ModelRunner(config, cfg, 64, model=random_model(cfg, torch.float32, torch.device("cpu"), 64))


def test_a_model_decodes_the_same_logits_through_the_triton_backend() -> None:
    """The backend where the engine uses it: a tiny random Llama's runner, three prompts
    prefilled, then one decode step through TorchSDPA and again through the Triton kernel."""
    runner = _tiny_runner(4)
    prompts = [[(7 * i + j) % 97 for j in range(n - 1)] for i, n in enumerate(CONTEXTS) if n > 1]
    runner.run_steps([SeqStep(0, p, t, True) for p, t in zip(prompts, TABLES[1:], strict=True)])
    decode = [SeqStep(n - 1, [5 + n], t, True) for n, t in zip(CONTEXTS, TABLES, strict=True)]
    runner.attention = TorchSDPA()
    _, expected = runner.run_steps(decode)
    runner.attention = attention_triton.TritonPagedDecode(block_n=16)
    _, got = runner.run_steps(decode)
    assert got is not None and expected is not None
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_model_prefills_in_chunks_to_the_same_logits_through_the_triton_backend() -> None:
    """Prefill where the engine runs it: a tiny random Llama's runner takes a prompt whole and
    another in two chunks (the second on cached context, beside the first prompt's decode),
    once through TorchSDPA and once, on a zeroed cache, through the Triton kernels (a group
    of 3 query heads per K/V head)."""
    runner = _tiny_runner(6)
    a, b = [(3 * j + 1) % 97 for j in range(10)], [(5 * j + 2) % 97 for j in range(13)]
    table_a, table_b = [9, 3, 14], [12, 2, 7, 15]
    steps = [
        [SeqStep(0, a, table_a, True), SeqStep(0, b[:6], table_b, False)],
        [SeqStep(10, [42], table_a, True), SeqStep(6, b[6:], table_b, True)],
    ]
    logits = []
    for backend in (TorchSDPA(), attention_triton.TritonPagedDecode(block_n=16, block_r=16)):
        runner.kv_cache.zero_()
        runner.attention = backend
        for step in steps:
            sampling, step_logits = runner.run_steps(step)
            assert sampling == [0, 1] or sampling == [0]
            logits.append(step_logits)
    for expected, got in zip(logits[:2], logits[2:], strict=True):
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

    from scalellm.models.triton_jit import FP_FUSION

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
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": FP_FUSION}
    )
    assert compiled.asm["cubin"]
    assert compiled.metadata.shared <= 48 * 1024  # fits without the opt-in to larger shared memory


@pytest.mark.skipif(not _cuda_compiler(), reason="triton has no NVIDIA backend here")
@pytest.mark.parametrize(("dtype", "block"), [("bf16", 64), ("fp32", 32)])
def test_the_prefill_kernel_compiles_for_an_h100_class_gpu(
    dtype: str, block: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The varlen prefill kernel lowers for sm_90 at an 8B Llama's shape with its default tiles
    (its shared memory within an H100's 227 KB a block; Triton opts in past 48 KB)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from scalellm.models.triton_jit import FP_FUSION

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    strides = ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_tb"]
    strides += ["stride_kb", "stride_kv", "stride_ks", "stride_kh"]
    signature = {"out_ptr": f"*{dtype}", "q_ptr": f"*{dtype}", "kv_ptr": f"*{dtype}"}
    signature |= {"table_ptr": "*i64", "bounds_ptr": "*i64", "scale": "fp32"} | dict.fromkeys(strides, "i32")
    constants = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_R": block, "BLOCK_D": 128}
    constants |= {"BLOCK_N": block, "UPCAST_DOT": False}
    signature |= dict.fromkeys(constants, "constexpr")
    source = ASTSource(attention_triton._prefill_kernel(), signature, constexprs=constants)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": FP_FUSION}
    )
    assert compiled.asm["cubin"]
    assert compiled.metadata.shared <= 227 * 1024


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_the_compiled_prefill_kernel_on_cuda_equals_torch_sdpa_at_an_8b_shape(
    engine_device: str, dtype: torch.dtype, tol: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under SCALELLM_TEST_DEVICE=cuda (skipped elsewhere): chunks of 1-1000 tokens on 0-1500
    cached ones, G 4, D 128, blocks of 16 scattered, against SDPA chunk by chunk in float32."""
    if engine_device != "cuda":
        pytest.skip("runs under SCALELLM_TEST_DEVICE=cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    device, block, heads, kv_heads, dim = torch.device("cuda"), 16, 32, 8, 128
    chunks = [(0, 1000), (1500, 300), (37, 2), (0, 129), (700, 64)]  # (context, length)
    g = torch.Generator().manual_seed(8)
    widths = [-(-(c + n) // block) for c, n in chunks]
    ids = torch.randperm(sum(widths), generator=g).tolist()
    spans, bounds, tables, row = [], [], [], 0
    for (context, n), w in zip(chunks, widths, strict=True):
        table, ids = ids[:w], ids[w:]
        spans.append(PrefillSpan(row, row + n, context, torch.tensor(table, device=device)))
        bounds.append([row, n, context])
        tables.append(table + [0] * (max(widths) - w))
        row += n
    kv = torch.randn(sum(widths), 2, 2, block, kv_heads, dim, generator=g).to(dtype).to(device)[:, 1]
    q = torch.randn(row, heads, dim, generator=g).to(dtype).to(device)
    new_kv = torch.zeros(row, 2, kv_heads, dim, dtype=dtype, device=device)  # read from kv, not here
    empty = torch.zeros(0, dtype=torch.long, device=device)
    backend = attention_triton.TritonPagedDecode()
    meta = AttentionMetadata(
        empty, empty, 0, None, None, tuple(spans), backend,
        prefill_bounds=torch.tensor(bounds, device=device),
        prefill_tables=torch.tensor(tables, device=device),
    )  # fmt: skip
    got = torch.empty_like(q)
    backend.prefill(q, new_kv, kv, meta, dim**-0.5, got)
    expected = torch.empty(q.shape, device=device)
    for span in spans:  # every chunk's K/V from the cache, as the kernel reads it
        n, total = span.end - span.start, span.context_len + span.end - span.start
        keys = attention._gather(kv[:, 0].float(), span.block_table)[:, :total].unsqueeze(0)
        values = attention._gather(kv[:, 1].float(), span.block_table)[:, :total].unsqueeze(0)
        rows = torch.arange(n, device=device).unsqueeze(1) + span.context_len
        mask = torch.arange(total, device=device).unsqueeze(0) <= rows
        query = q[span.start : span.end].float().transpose(0, 1).unsqueeze(0)
        out = attention.sdpa(query, keys, values, dim**-0.5, mask=mask)
        expected[span.start : span.end] = out.squeeze(0).transpose(0, 1)
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


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
