"""Greedy output is identical to Hugging Face transformers: the project's correctness anchor."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.request import Request
from scalellm.types import SamplingParams
from tests.tiny_models import hf_greedy


def _run(engine: LLMEngine, prompts: list[list[int]], sampling: int | list[SamplingParams]) -> list[Request]:
    """Run the prompts to the end (greedy for `sampling` tokens, or one SamplingParams each)."""
    if isinstance(sampling, int):
        sampling = [SamplingParams(temperature=0.0, max_tokens=sampling, ignore_eos=True)] * len(prompts)
    reqs = [
        engine.add_request(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, sampling, strict=True))
    ]
    while engine.has_unfinished():
        engine.step()
    assert engine.num_free_blocks == engine.blocks.num_blocks, "blocks leaked"
    return reqs


@pytest.mark.parametrize(
    "family", ["llama", "llama3", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe", "qwen2_moe"]
)
def test_tiny_families_match_transformers(tiny_model_factory, family: str, engine_device: str) -> None:  # type: ignore[no-untyped-def]
    model_dir: Path = tiny_model_factory(family)
    rng = random.Random(family)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 90))] for _ in range(10)]
    expected = hf_greedy(model_dir, prompts, max_new_tokens=20, device=engine_device)
    # A small cache and budget force chunked prefill, mixed batches and preemption.
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            device=engine_device,
            dtype="float32",
            num_kv_blocks=64,
            block_size=4,
            max_num_batched_tokens=48,
            max_num_seqs=6,
        )
    )
    reqs = _run(engine, prompts, 20)
    assert [r.output_token_ids for r in reqs] == expected
    assert sum(r.num_preemptions for r in reqs) > 0  # some were recomputed after losing their blocks


def test_seeded_sampling_is_unchanged_by_preemption(tiny_llama: Path, engine_device: str) -> None:
    """A seeded request that loses its blocks and is recomputed samples what it samples unpreempted."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(30, 90))] for _ in range(8)]
    params = [SamplingParams(temperature=0.9, seed=100 + i, max_tokens=24, ignore_eos=True) for i in range(8)]

    def run(num_kv_blocks: int) -> list[Request]:
        engine = LLMEngine(
            EngineConfig(
                model=str(tiny_llama), device=engine_device, dtype="float32", num_kv_blocks=num_kv_blocks,
                block_size=4, max_num_batched_tokens=48, max_num_seqs=6,
            )
        )  # fmt: skip
        return _run(engine, prompts, params)

    roomy, tight = run(400), run(64)
    assert sum(r.num_preemptions for r in roomy) == 0 and sum(r.num_preemptions for r in tight) > 0
    assert [r.output_token_ids for r in tight] == [r.output_token_ids for r in roomy]


def test_prefix_cache_hits_give_the_same_tokens(tiny_llama: Path, engine_device: str) -> None:
    rng = random.Random(7)
    shared = [rng.randrange(3, 512) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(rng.randint(1, 20))] for _ in range(4)]
    expected = hf_greedy(tiny_llama, prompts, max_new_tokens=12, device=engine_device)
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_llama), device=engine_device, dtype="float32", num_kv_blocks=200, block_size=4
        )
    )
    assert [r.output_token_ids for r in _run(engine, prompts[:1], 12)] == expected[:1]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reqs = [engine.add_request(f"b{i}", p, params) for i, p in enumerate(prompts[1:])]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_token_ids for r in reqs] == expected[1:]
    assert all(r.num_cached_tokens == 40 for r in reqs)


@pytest.mark.slow
def test_demo_model_matches_transformers(demo_model_dir: Path) -> None:
    from scalellm.text import Tokenizer

    tok = Tokenizer.from_dir(demo_model_dir)
    texts = [
        "The three primary colors are",
        "def fibonacci(n):\n    ",
        "Translate to French: The weather is lovely today.",
        "In 1969, the first humans",
    ]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Name two planets."}], add_generation_prompt=True
    )
    prompts = [tok.encode(t) for t in texts] + [tok.encode(chat, add_special_tokens=False)]
    expected = hf_greedy(demo_model_dir, prompts, max_new_tokens=24)
    engine = LLMEngine(
        EngineConfig(model=str(demo_model_dir), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=64)
    )
    assert [r.output_token_ids for r in _run(engine, prompts, 24)] == expected


@pytest.mark.slow
def test_bfloat16_logits_keep_a_near_tie_the_float32_model_decides(demo_model_dir: Path) -> None:
    """The demo model's first answer token to this question: "The" over "L" by 0.08 in float32.
    bfloat16 logits there are 0.125 apart, so rounded ones tie and the argmax took "L" (token
    id order) and went on "L'Etoile, la Marseillaise, ..."; the CPU's lm_head keeps its float32
    sums, and the bfloat16 model answers as the float32 one does."""
    from scalellm.engine.cpu_kernels import available
    from scalellm.text import Tokenizer

    if not available():
        pytest.skip("no C++ toolchain for the CPU kernels (lm_head is torch's)")
    tok = Tokenizer.from_dir(demo_model_dir)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    prompt = tok.encode(chat, add_special_tokens=False)
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), dtype="bfloat16", num_kv_blocks=64))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    (req,) = _run(engine, [prompt], [params])
    assert tok.decode(req.output_token_ids).startswith("The capital of France is Paris")
    top = req.logprobs[0].top
    assert [tok.decode([t]) for t, _ in top] == ["The", "L"] and top[0][1] > top[1][1]


@pytest.mark.parametrize("case", ["masked", "causal"])
def test_sdpa_with_repeated_heads_equals_grouped_heads(case: str) -> None:
    """The CUDA path of attention.sdpa (K/V heads repeated) computes what grouped SDPA computes."""
    import torch

    from scalellm.engine.attention import sdpa

    gen = torch.Generator().manual_seed(0)
    q_len = 1 if case == "masked" else 12
    query = torch.randn(3, 9, q_len, 16, generator=gen)
    keys, values = torch.randn(2, 3, 3, 12, 16, generator=gen)
    mask = None
    if case == "masked":
        mask = torch.rand(3, 1, 1, 12, generator=gen) > 0.3
        mask[..., 0] = True  # every row attends somewhere
    kwargs = dict(mask=mask, causal=case == "causal")
    grouped = sdpa(query, keys, values, 0.25, expand_heads=False, **kwargs)
    repeated = sdpa(query, keys, values, 0.25, expand_heads=True, **kwargs)
    torch.testing.assert_close(repeated, grouped)


def test_decode_with_heads_folded_into_the_query_length_equals_repeated_heads() -> None:
    import torch

    from scalellm.engine.attention import _decode, _gather, sdpa

    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.randn(2, 10, 4, 3, 16, generator=gen)  # [blocks, block_size, Hkv, D]
    tables = torch.tensor([[1, 4, 0], [7, 2, 9]])
    context = torch.tensor([9, 12])
    mask = (torch.arange(12).unsqueeze(0) < context.unsqueeze(1))[:, None, None, :]
    q = torch.randn(2, 9, 16, generator=gen)  # 9 query heads over 3 K/V heads
    keys, values = _gather(k_cache, tables), _gather(v_cache, tables)
    expected = sdpa(q.unsqueeze(2), keys, values, 0.25, mask=mask, expand_heads=True).squeeze(2)
    torch.testing.assert_close(_decode(q, k_cache, v_cache, tables, mask, 0.25), expected)


def test_a_resumed_request_continues_exactly(tiny_llama: Path, engine_device: str) -> None:
    """Stream migration: a request given the first k tokens of another engine's output (and
    computing them again with its prompt) produces the rest of that output exactly, greedy and
    seeded alike, with penalties that count the resumed tokens."""
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(5, 40))] for _ in range(4)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=7, max_tokens=16, ignore_eos=True),
        SamplingParams(
            temperature=0.8, seed=8, top_k=20, presence_penalty=1.5, max_tokens=16, ignore_eos=True
        ),
        SamplingParams(temperature=0.0, frequency_penalty=2.0, max_tokens=16, ignore_eos=True),
    ]

    def engine() -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=str(tiny_llama), device=engine_device, dtype="float32", num_kv_blocks=200, block_size=4
            )
        )

    whole = [r.output_token_ids for r in _run(engine(), prompts, params)]
    second = engine()
    resumed = []
    for i, (prompt, sp, out) in enumerate(zip(prompts, params, whole, strict=True)):
        k = 3 + 4 * i  # migrated after k tokens
        req = second.make_request(f"r{i}", prompt, sp, resume_token_ids=out[:k])
        assert req.num_output_tokens == k and req.resumed_tokens == k
        second.add(req)
        resumed.append(req)
    while second.has_unfinished():
        second.step()
    assert [r.output_token_ids for r in resumed] == whole
    assert second.num_free_blocks == second.blocks.num_blocks


def test_resume_token_ids_are_validated(tiny_llama: Path, engine_device: str) -> None:
    engine = LLMEngine(
        EngineConfig(model=str(tiny_llama), device=engine_device, dtype="float32", num_kv_blocks=32)
    )
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match="resume_token_ids contains"):
        engine.make_request("a", [5, 6], params, resume_token_ids=[10**9])
    with pytest.raises(ValueError, match="nothing would be left"):
        engine.make_request("b", [5, 6], params, resume_token_ids=[7, 8, 9, 10])
    with pytest.raises(ValueError, match="prefill-only"):
        engine.make_request("c", [5, 6], params, prefill_only=True, resume_token_ids=[7])
