"""Bucketed pure-decode steps (engine/cuda_graphs.py): on CPU the static buffers and padding run
without capture; under SCALELLM_TEST_DEVICE=cuda the same tests capture and replay CUDA graphs.
A padded step must give the unpadded eager step's logits and write nothing but its own slots
(and the scratch block)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from scalellm.engine import attention_triton, cpu_kernels
from scalellm.engine.attention import TorchSDPA
from scalellm.engine.config import EngineConfig
from scalellm.engine.cuda_graphs import graph_buckets, graph_limit, pick_bucket, why_eager
from scalellm.engine.engine import LLMEngine
from scalellm.engine.kv_quant import Int8KVSDPA, quantize_rows
from scalellm.engine.model_runner import ModelRunner
from scalellm.engine.step_inputs import SeqStep
from scalellm.models.config import ModelConfig
from scalellm.models.loader import random_model
from scalellm.types import SamplingParams
from tests.tiny_models import hf_greedy

BLOCK_SIZE, NUM_BLOCKS, MAX_LEN, VOCAB = 4, 24, 64, 97
CFG = ModelConfig.from_dict(
    {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
     "max_position_embeddings": MAX_LEN}
)  # fmt: skip
MOE_CFG = ModelConfig.from_dict(
    {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
     "num_local_experts": 4, "num_experts_per_tok": 2}
)  # fmt: skip


def test_buckets_are_powers_of_two_to_8_then_multiples_of_8_up_to_the_limit() -> None:
    buckets = graph_buckets(256)
    assert buckets[:6] == (1, 2, 4, 8, 16, 24) and buckets[-1] == 256 and len(buckets) == 35
    assert graph_buckets(6) == (1, 2, 4, 6) and graph_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert graph_buckets(1) == (1,) and graph_buckets(0) == ()
    assert [pick_bucket(buckets, b) for b in (1, 3, 5, 8, 9, 250, 256)] == [1, 4, 8, 8, 16, 256, 256]
    assert pick_bucket(buckets, 257) is None


def test_graphs_are_on_by_default_only_on_cuda_and_off_where_unsafe() -> None:
    assert graph_limit(EngineConfig(device="cpu")) == 0
    assert graph_limit(EngineConfig(device="cuda")) == 64  # 256, capped at max_num_seqs
    assert graph_limit(EngineConfig(device="cuda", max_num_seqs=512)) == 256
    assert graph_limit(EngineConfig(device="cuda", cuda_graph_max_batch=0)) == 0
    assert graph_limit(EngineConfig(device="cpu", cuda_graph_max_batch=8)) == 8
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        EngineConfig(cuda_graph_max_batch=-1)

    on = EngineConfig(device="cpu", cuda_graph_max_batch=8)
    safe = cpu_kernels.CpuPagedDecode(None)
    assert why_eager(on, CFG, safe, quantized_kv=False) is None
    assert "0" in (why_eager(EngineConfig(device="cpu"), CFG, safe, quantized_kv=False) or "")
    assert "int8" in (why_eager(on, CFG, Int8KVSDPA(torch.float32), quantized_kv=True) or "")
    assert "not graph-safe" in (why_eager(on, CFG, TorchSDPA(), quantized_kv=False) or "")
    assert "mixture-of-experts" in (why_eager(on, MOE_CFG, safe, quantized_kv=False) or "")
    tp = EngineConfig(device="cpu", cuda_graph_max_batch=8, tensor_parallel_size=2)
    assert "tensor parallelism" in (why_eager(tp, CFG, safe, quantized_kv=False) or "")


CONTEXTS = (1, 5, 17, 8, 3, 12, 9)


def _tables() -> list[list[int]]:
    """Disjoint block ids (from 1) for each sequence's context and its next token."""
    tables, next_id = [], 1
    for c in CONTEXTS:
        n = c // BLOCK_SIZE + 1
        tables.append(list(range(next_id, next_id + n)))
        next_id += n
    assert next_id <= NUM_BLOCKS
    return tables


def _decodes(rows: int, shift: int) -> list[SeqStep]:
    return [
        SeqStep(c + shift, [(11 * i + shift) % VOCAB], t, True)
        for i, (c, t) in enumerate(zip(CONTEXTS[:rows], _tables(), strict=False))
    ]


def _runners(device: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelRunner, ModelRunner]:
    """An eager runner and a bucketed one (largest bucket 8) over one model (backend int8: over
    an int8 KV cache, through the CPU kernels)."""
    config = EngineConfig(device=device, dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS)
    if backend == "int8":
        config = replace(config, kv_cache_dtype="int8")
    model = random_model(CFG, torch.float32, torch.device(device), MAX_LEN)
    eager = ModelRunner(config, CFG, MAX_LEN, model=model)
    bucketed = ModelRunner(replace(config, cuda_graph_max_batch=8), CFG, MAX_LEN, model=model)
    if bucketed.graphs is None:
        pytest.skip(f"no graph-safe attention backend here ({bucketed.attention.name})")
    if backend == "triton":  # the CUDA backend, through Triton's interpreter
        if device != "cpu" or not attention_triton.AVAILABLE:
            pytest.skip("the Triton variant is the CPU interpreter's (CUDA runs it as the engine's)")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        triton = attention_triton.TritonPagedDecode(16)
        eager.attention = bucketed.attention = bucketed.graphs.backend = triton
    return eager, bucketed


def _random(like: torch.Tensor, seed: int) -> torch.Tensor:
    """Random cache contents for ``like``: normal values, or int8 rows of them and their scales."""
    gen = torch.Generator().manual_seed(seed)
    if like.dtype != torch.int8:
        return torch.randn(like.shape, generator=gen)
    return quantize_rows(torch.randn(*like.shape[:-1], like.shape[-1] - 2, generator=gen))


def _slots(steps: list[SeqStep]) -> set[tuple[int, int]]:
    return {(s.block_ids[s.start // BLOCK_SIZE], s.start % BLOCK_SIZE) for s in steps}


def _changed(after: torch.Tensor, before: torch.Tensor) -> set[tuple[int, int]]:
    """(block, offset) of every cache slot whose K or V changed in any layer."""
    diff = (after != before).permute(0, 3, 1, 2, 4, 5).flatten(2).any(dim=2)
    return {(b, o) for b, o in diff.nonzero().tolist()}


@pytest.mark.parametrize("backend", ["engine", "triton", "int8"])
def test_a_padded_bucket_step_equals_the_eager_step_and_writes_only_its_own_slots(
    engine_device: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager, bucketed = _runners(engine_device, backend, monkeypatch)
    graphs = bucketed.graphs
    assert graphs is not None and graphs.buckets == (1, 2, 4, 8)
    scratch = graphs.kv_blocks[graphs.scratch_block]
    assert graphs.scratch_block == NUM_BLOCKS and bucketed.kv_cache.shape[0] == NUM_BLOCKS
    # 7 rows in bucket 8, then 3 in bucket 4: row 3 held a real sequence and must be padding again
    # (the interpreted Triton kernel, slow, runs bucket 4 alone).
    plan = [_decodes(3, 0)] if backend == "triton" else [_decodes(7, 0), _decodes(3, 1)]
    for replays, steps in enumerate(plan, start=1):
        # Fresh contents each step (blocks get reused): a stale row rewriting its old K/V shows,
        # and so does the padding, which writes the same K/V every step.
        cache = _random(eager.kv_cache, replays)
        eager.kv_cache.copy_(cache)
        bucketed.kv_cache.copy_(cache)
        scratch.copy_(_random(scratch, 100 + replays))
        before, scratch_before = bucketed.kv_cache.clone(), scratch.clone()
        sampling, got = bucketed.run_steps(steps)
        _, want = eager.run_steps(steps)
        assert got is not None and want is not None and graphs.replays == replays
        assert sampling == list(range(len(steps)))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
        assert _changed(bucketed.kv_cache, before) == _slots(steps)  # nothing else of the cache
        torch.testing.assert_close(bucketed.kv_cache, eager.kv_cache, rtol=1e-4, atol=1e-4)
        # The padding rows wrote slot 0 of the scratch block and nothing else of it.
        assert (scratch[:, :, 0] != scratch_before[:, :, 0]).any()
        torch.testing.assert_close(scratch[:, :, 1:], scratch_before[:, :, 1:], rtol=0, atol=0)

    if backend == "triton":
        return
    prefill = [SeqStep(0, [3, 4, 5, 6, 7], [NUM_BLOCKS - 2, NUM_BLOCKS - 1], True), *_decodes(2, 2)]
    _, got = bucketed.run_steps(prefill)
    _, want = eager.run_steps(prefill)
    assert graphs.replays == 2  # a step with a prefill chunk runs eagerly
    assert got is not None and want is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_engine_greedy_tokens_are_the_same_with_bucketed_decodes(
    tiny_llama: Path, engine_device: str
) -> None:
    """Through the engine: prefill chunks, mixed and pure-decode steps of every batch size up to
    6, bucketed (captured on CUDA) against eager and transformers."""
    rng = random.Random(22)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(9)]
    expected = hf_greedy(tiny_llama, prompts, max_new_tokens=12, device=engine_device)
    outputs = []
    for limit in (0, 8):
        engine = LLMEngine(
            EngineConfig(
                model=str(tiny_llama), device=engine_device, dtype="float32", num_kv_blocks=96,
                block_size=4, max_num_batched_tokens=64, max_num_seqs=6, cuda_graph_max_batch=limit,
            )
        )  # fmt: skip
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        reqs = [engine.add_request(str(i), p, params) for i, p in enumerate(prompts)]
        while engine.has_unfinished():
            engine.step()
        outputs.append([r.output_token_ids for r in reqs])
        graphs = engine.runner.graphs
        if limit and graphs is None:
            pytest.skip(f"no graph-safe attention backend here ({engine.runner.attention.name})")
        assert graphs is None if limit == 0 else graphs is not None and graphs.replays > 0
        engine.close()
    assert outputs[0] == outputs[1] == expected
