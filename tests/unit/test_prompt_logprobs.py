"""Prompt logprobs: computed at prefill over every prompt position (chunked prefill, prefix-cache
hits and preemption included) and equal to transformers' log-softmax of its own logits."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.events import TokenEvent
from scalellm.types import InvalidParameter, SamplingParams


def _hf_prompt_logprobs(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i is the distribution of prompt token i + 1."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1].float()
    return logits.log_softmax(dim=-1)


def _engine(model_dir: Path, **kw: object) -> LLMEngine:
    config = {"model": str(model_dir), "dtype": "float32", "num_kv_blocks": 64, "block_size": 4} | kw
    return LLMEngine(EngineConfig(**config))  # type: ignore[arg-type]


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[TokenEvent]]:
    reqs = [engine.add_request(str(i), p, params) for i, p in enumerate(prompts)]
    events: dict[str, list[TokenEvent]] = {r.request_id: [] for r in reqs}
    while engine.has_unfinished():
        for e in engine.step():
            events[e.request_id].append(e)
    assert engine.num_free_blocks == engine.blocks.num_blocks, "blocks leaked"
    return [events[r.request_id] for r in reqs]


def test_prompt_logprobs_equal_transformers_across_chunks_and_cache_hits(tiny_llama: Path) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (37, 2, 90)]
    prompts.append([*prompts[2][:60], 7, 8, 9])  # shares 15 full blocks with the one before
    # A small budget splits prompts over several chunks and steps.
    engine = _engine(tiny_llama, max_num_batched_tokens=16, enable_prefix_caching=True)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=3)
    runs = _run(engine, prompts[:3], params) + _run(engine, prompts[3:], params)  # the last one after
    for prompt, events in zip(prompts, runs, strict=True):
        got = events[0].prompt_logprobs
        assert got is not None and [e.prompt_logprobs for e in events[1:]] == [None] * (len(events) - 1)
        want = _hf_prompt_logprobs(tiny_llama, prompt)
        assert [lp.token_id for lp in got] == prompt[1:]
        chosen = want.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in got]), chosen, rtol=1e-4, atol=1e-4)
        top = want.topk(3, dim=-1)
        assert [[t for t, _ in lp.top] for lp in got] == top.indices.tolist()
    # Without prompt_logprobs the last prompt would have hit the cache: it did not here.
    assert runs[3][-1].outcome is not None and runs[3][-1].outcome.num_cached_tokens == 0


def test_preemption_does_not_repeat_them(tiny_llama: Path) -> None:
    rng = random.Random(8)
    prompts = [[rng.randrange(3, 512) for _ in range(40)] for _ in range(6)]
    engine = _engine(tiny_llama, num_kv_blocks=40, max_num_batched_tokens=48, max_num_seqs=6)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=0)
    runs = _run(engine, prompts, params)
    assert sum(e.request.num_preemptions for events in runs for e in events[-1:]) > 0
    for prompt, events in zip(prompts, runs, strict=True):
        got = events[0].prompt_logprobs
        assert got is not None and [lp.token_id for lp in got] == prompt[1:] and all(not lp.top for lp in got)
        # what the offline API reads at the end: a recompute added nothing
        assert [lp.token_id for lp in events[-1].request.prompt_logprobs] == prompt[1:]


def test_offline_llm_and_refusals(tiny_chat_model: Path) -> None:
    from scalellm import LLM

    llm = LLM(model=str(tiny_chat_model), dtype="float32", num_kv_blocks=64)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(max_tokens=1, prompt_logprobs=1))[
        0
    ]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert [lp.token_id for lp in out.prompt_logprobs[1:] if lp is not None] == [6, 7, 8]
    assert (
        llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=1))[0].prompt_logprobs is None
    )
    with pytest.raises(InvalidParameter, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(InvalidParameter, match="prompt_logprobs"):
        llm.engine.make_request("x", [1, 2], SamplingParams(prompt_logprobs=0), prefill_only=True)
