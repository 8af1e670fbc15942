"""Tensor parallelism on CPU over gloo: TP=2 gives TP=1's (and transformers') greedy output for
dense and mixture-of-experts models, refuses what it cannot split, and leaves no process behind."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.model_runner import SeqStep
from scalellm.registry import WorkerRole
from scalellm.types import SamplingParams
from scalellm.worker.config import WorkerConfig
from tests.procs import child_pids
from tests.tiny_models import hf_greedy


def _children() -> set[int]:
    return set(child_pids(os.getpid()))


def _greedy(model: Path, prompts: list[list[int]], tp: int) -> list[list[int]]:
    """Greedy continuations with chunked prefill, mixed batches and preemption (a small cache)."""
    engine = LLMEngine(
        EngineConfig(
            model=str(model), dtype="float32", num_kv_blocks=28, block_size=4, max_num_batched_tokens=32,
            max_num_seqs=4, tensor_parallel_size=tp, num_threads=1,
        )
    )  # fmt: skip
    try:
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        reqs = [engine.add_request(str(i), p, params) for i, p in enumerate(prompts)]
        while engine.has_unfinished():
            engine.step()
        assert engine.num_free_blocks == engine.blocks.num_blocks, "blocks leaked"
        assert sum(r.num_preemptions for r in reqs) > 0
        return [r.output_token_ids for r in reqs]
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "qwen2_moe"])
def test_tp2_matches_tp1_and_transformers(tiny_model_factory, family: str) -> None:  # type: ignore[no-untyped-def]
    """llama: grouped-query heads split 2+1 / 2+1; qwen3_moe: q/k norms, a dense layer, experts
    split 2+2; qwen2_moe: q/k/v biases, the shared expert row-split and tied embeddings."""
    model: Path = tiny_model_factory(family)
    rng = random.Random(family)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(8, 60))] for _ in range(6)]
    before = _children()
    tp1 = _greedy(model, prompts, 1)
    assert _greedy(model, prompts, 2) == tp1 == hf_greedy(model, prompts, max_new_tokens=10)
    assert _children() == before, "a rank process outlived engine.close()"


def test_a_model_that_does_not_split_evenly_is_refused_before_any_process_starts(
    tiny_llama: Path,
) -> None:
    before = _children()
    with pytest.raises(ValueError, match="num_key_value_heads 2"):
        LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", tensor_parallel_size=4))
    assert _children() == before


@pytest.mark.parametrize(
    "settings",
    [
        {"tensor_parallel_size": 0},
        {"tensor_parallel_size": 2, "quantization": "int8"},
        {"tensor_parallel_size": 2, "kv_cache_dtype": "int8"},
    ],
)
def test_unsupported_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(device="cpu", **settings)  # type: ignore[arg-type]


def test_every_role_takes_a_tensor_parallel_size() -> None:
    engine = EngineConfig(tensor_parallel_size=2)
    for role in (WorkerRole.BOTH, WorkerRole.PREFILL, WorkerRole.DECODE):
        assert WorkerConfig(role=role, engine=engine).engine.tensor_parallel_size == 2


@pytest.mark.slow
def test_landed_kv_reaches_each_rank_as_its_heads(tiny_llama: Path) -> None:
    """KV landed with all the model's heads (kv_landing) is scattered to the ranks, rank r taking
    heads [r * H/N, (r + 1) * H/N): gathering the blocks back gives exactly what landed, and the
    blocks not scattered keep what the ranks held."""
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_llama), dtype="float32", num_kv_blocks=12, block_size=4, tensor_parallel_size=2
        )
    )
    try:
        landing = engine.kv_landing()
        assert landing.shape[0] == engine.num_blocks and landing.shape[4] == engine.model_config.num_kv_heads
        assert engine.kv_cache.shape[4] * 2 == landing.shape[4]
        generator = torch.Generator().manual_seed(0)
        landing.copy_(torch.randn(landing.shape, generator=generator))
        engine.scatter_kv([5, 2, 9])
        assert torch.equal(engine.gather_kv([5, 2, 9]), landing[[5, 2, 9]])
        assert torch.equal(engine.gather_kv([0, 1, 3]), torch.zeros_like(landing[[0, 1, 3]]))
        assert torch.equal(engine.kv_cache[5], landing[5, :, :, :, : engine.kv_cache.shape[4]])
    finally:
        engine.close()


def test_a_step_travels_to_the_ranks_as_integers() -> None:
    steps = [
        SeqStep(12, [7], [3, 9, 1, 4], True),
        SeqStep(0, [5, 6, 8], [2], False),
        SeqStep(4, [], [], True),
    ]
    assert SeqStep.decode(SeqStep.encode(steps)) == steps
    assert SeqStep.decode(SeqStep.encode([])) == []


@pytest.mark.slow
def test_the_offline_llm_splits_over_two_processes_and_closes_them(tiny_chat_model: Path) -> None:
    from scalellm import LLM

    prompts = ["Hello, my name is", "The capital of France is"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    before = _children()
    with LLM(model=str(tiny_chat_model), dtype="float32", num_kv_blocks=64) as llm:
        single = [o.outputs[0].text for o in llm.generate(prompts, params)]
    with LLM(model=str(tiny_chat_model), dtype="float32", num_kv_blocks=64, tensor_parallel_size=2) as llm:
        assert len(_children() - before) == 1
        assert [o.outputs[0].text for o in llm.generate(prompts, params)] == single
    assert _children() == before
