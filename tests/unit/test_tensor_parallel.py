"""Tensor parallelism on CPU over gloo: TP=2 gives TP=1's (and transformers') greedy output for
dense and mixture-of-experts models, refuses what it cannot split, and leaves no process behind."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.step_inputs import SeqStep
from scalellm.models.config import ModelConfig
from scalellm.models.loader import load_model
from scalellm.models.moe import SparseMoeBlock
from scalellm.models.parallel import TensorParallel, check_divisible
from scalellm.registry import WorkerRole
from scalellm.types import SamplingParams
from scalellm.worker.config import WorkerConfig, parse_on_off
from tests.procs import child_pids
from tests.tiny_models import hf_greedy


def _children() -> set[int]:
    return set(child_pids(os.getpid()))


def _greedy(model: Path, prompts: list[list[int]], tp: int, expert_parallel: bool = False) -> list[list[int]]:
    """Greedy continuations with chunked prefill, mixed batches and preemption (a small cache)."""
    engine = LLMEngine(
        EngineConfig(
            model=str(model), dtype="float32", num_kv_blocks=28, block_size=4, max_num_batched_tokens=32,
            max_num_seqs=4, tensor_parallel_size=tp, num_threads=1, expert_parallel=expert_parallel,
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


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_parallel_matches_tp1_and_transformers(tiny_model_factory, family: str) -> None:  # type: ignore[no-untyped-def]
    """Experts placed whole (2 + 2 of 4) instead of each split by rows: the same greedy tokens."""
    model: Path = tiny_model_factory(family)
    rng = random.Random(f"ep-{family}")
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(8, 60))] for _ in range(6)]
    expected = hf_greedy(model, prompts, max_new_tokens=10)
    assert _greedy(model, prompts, 2, expert_parallel=True) == expected == _greedy(model, prompts, 1)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_a_rank_holds_its_rows_of_every_expert_or_its_whole_experts(
    tiny_model_factory,  # type: ignore[no-untyped-def]
    expert_parallel: bool,
) -> None:
    """Rank 1 of 2 loads (no group needed to load): tensor parallel, rows [I/2, I) of all 4
    experts (gate/up rows, down columns); expert parallel, experts 2 and 3 whole."""
    model: Path = tiny_model_factory("qwen3_moe")
    cfg = ModelConfig.from_dir(model)
    assert cfg.moe is not None
    tp = TensorParallel(rank=1, size=2, expert_parallel=expert_parallel)
    loaded = load_model(model, cfg, torch.float32, torch.device("cpu"), 64, tp=tp)
    block = loaded.get_submodule("layers.0.mlp")
    assert isinstance(block, SparseMoeBlock)
    ckpt = load_file(str(model / "model.safetensors"))
    inter = cfg.moe.intermediate_size
    experts, rows = (
        (range(2, 4), slice(0, inter)) if expert_parallel else (range(4), slice(inter // 2, inter))
    )
    assert block.w_gate_up.shape[0] == len(experts) and block.w_down.shape[2] == rows.stop - rows.start
    for local, e in enumerate(experts):
        name = f"model.layers.0.mlp.experts.{e}"
        gate_up = torch.cat([ckpt[f"{name}.gate_proj.weight"][rows], ckpt[f"{name}.up_proj.weight"][rows]])
        assert torch.equal(block.w_gate_up[local], gate_up)
        assert torch.equal(block.w_down[local], ckpt[f"{name}.down_proj.weight"][:, rows])


def test_expert_parallel_asks_the_expert_count_to_divide_and_tensor_parallel_the_rows(
    tiny_model_factory,  # type: ignore[no-untyped-def]
) -> None:
    cfg = ModelConfig.from_dir(tiny_model_factory("mixtral"))  # 4 experts, intermediate 128
    check_divisible(cfg, 2, expert_parallel=True)
    with pytest.raises(ValueError, match=r"num_experts \(expert parallel\) 4"):
        check_divisible(dataclasses.replace(cfg, num_heads=8, num_kv_heads=8, vocab_size=1024), 8, True)
    check_divisible(
        dataclasses.replace(cfg, num_heads=8, num_kv_heads=8, vocab_size=1024), 8
    )  # rows: 128 / 8


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
    assert [parse_on_off(v) for v in ("on", "TRUE", "1", "off", "no", "0")] == [True] * 3 + [False] * 3
    with pytest.raises(ValueError, match="expected on or off"):
        parse_on_off("maybe")


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
