"""Speculative decoding by prompt lookup (engine/speculative.py): drafts found as they should be,
and an engine that drafts gives exactly what one that does not gives (and transformers gives),
whatever else is in the batch, wherever a request stops."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from scalellm.engine.attention import select_backend
from scalellm.engine.block_manager import BlockManager
from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.request import Request
from scalellm.engine.scheduler import Scheduler, SchedulerConfig
from scalellm.engine.speculative import accepted, propose, speculates
from scalellm.engine.step_inputs import SeqStep, build_inputs
from scalellm.types import SamplingParams
from tests.procs import child_pids
from tests.tiny_models import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


# ---- drafts ----------------------------------------------------------------------------------------


def test_propose_copies_what_followed_the_longest_earlier_match() -> None:
    seq = [1, 2, 3, 4, 5, 6, 9, 2, 3, 7, 8, 1, 2, 3]
    # 3-gram (1, 2, 3) occurred at the start: what followed it
    assert propose(seq, 3, 2, 4) == [4, 5, 6]
    assert propose(seq, 10, 2, 4) == [4, 5, 6, 9, 2, 3, 7, 8, 1, 2, 3][:10]
    # without 3-grams the last (2, 3) wins: it followed 9 -> 7, 8
    assert propose(seq, 2, 2, 2) == [7, 8]
    assert propose([5, 6, 7, 8], 3, 1, 3) == []  # nothing occurred before
    assert propose([4, 4, 4], 5, 1, 2) == [4]  # the match may overlap the suffix
    assert propose([1, 2], 3, 2, 4) == []  # too short for a 2-gram and a token after it
    assert propose(seq, 0, 2, 4) == []


def test_propose_matches_whole_tokens_only() -> None:
    """Token ids are searched as 4-byte little-endian words: a byte run that straddles two tokens
    is no match. The bytes of (1, 2) are 01 00 00 00 02 00 00 00, which the first three tokens
    below hold from their fourth byte on."""
    straddling = [0x01000000, 0x02000000, 0x05000000]
    assert propose([*straddling, 9, 1, 2], 1, 2, 2) == []
    assert propose([*straddling, 1, 2, 7, 1, 2], 1, 2, 2) == [7]


def test_the_drafter_grows_its_words_with_each_step_and_forgets_finished_requests() -> None:
    from scalellm.engine.speculative import NgramDrafter

    rng = random.Random(1)
    drafter = NgramDrafter(num_tokens=3, max_rows=8)
    reqs = [
        Request(f"r{i}", [rng.randrange(1, 9) for _ in range(20)], GREEDY, max_tokens=40) for i in range(3)
    ]
    for _ in range(15):
        for req in reqs:
            req.num_computed_tokens = req.num_tokens - 1
        drafter.draft(reqs)
        for req in reqs:
            assert req.draft_token_ids == propose(req.token_ids, 3, 2, 4)
            req.append_token(rng.randrange(1, 9))
    assert set(drafter._words) == {"r0", "r1", "r2"}
    reqs[0].num_computed_tokens = reqs[0].num_tokens - 1
    drafter.draft(reqs[:1])
    assert set(drafter._words) == {"r0"}  # the others left the running batch


def test_accepted_keeps_drafts_up_to_the_first_disagreement_and_the_models_token() -> None:
    assert accepted([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accepted([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accepted([5, 6, 7], [1, 6, 7, 8]) == [1]
    assert accepted([], [3]) == [3]


def test_decoding_requests_without_logits_controls_draft() -> None:
    def decoding(params: SamplingParams) -> Request:
        req = Request("r", [1, 2, 3], params, max_tokens=10)
        req.num_computed_tokens = 2
        return req

    assert speculates(decoding(GREEDY))
    assert speculates(decoding(SamplingParams(temperature=0.7, seed=3)))
    assert speculates(decoding(replace(GREEDY, logprobs=2)))
    for params in (
        replace(GREEDY, presence_penalty=0.5),
        replace(GREEDY, allowed_token_ids=(1, 2)),
        replace(GREEDY, prompt_logprobs=1),
    ):
        assert not speculates(decoding(params)), params
    prefilling = decoding(GREEDY)
    prefilling.num_computed_tokens = 0
    assert not speculates(prefilling)
    last = Request("r", [1, 2, 3], GREEDY, max_tokens=1)
    last.num_computed_tokens = 2
    assert not speculates(last)  # one token left: nothing to draft beside it


# ---- scheduling and inputs -------------------------------------------------------------------------


def _decoding(rid: str, blocks: BlockManager, n: int = 8) -> Request:
    req = Request(rid, list(range(1, n + 1)), GREEDY, max_tokens=40)
    assert blocks.allocate(req, n)
    req.num_computed_tokens = n - 1
    return req


def test_drafts_ride_within_the_budget_and_never_take_the_last_blocks() -> None:
    blocks = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=6, max_rows_with_drafts=16), blocks)
    a, b = _decoding("a", blocks), _decoding("b", blocks)
    sched.running = [a, b]
    a.draft_token_ids, b.draft_token_ids = [11, 12, 13, 14], [21, 22, 23, 24]
    out = sched.schedule()
    by_id = {s.request.request_id: s for s in out.scheduled}
    # a: its token and 4 drafts (5 of the 6 budget tokens); b: its token only
    assert (by_id["a"].num_new_tokens, by_id["a"].num_draft_tokens) == (5, 4)
    assert (by_id["b"].num_new_tokens, by_id["b"].num_draft_tokens) == (1, 0)
    assert by_id["a"].samples and by_id["b"].samples
    assert SeqStep.of(by_id["a"]).token_ids == [8, 11, 12, 13, 14]
    # a prompt that arrives takes its tokens before drafts take what is left
    sched.update(out, {"a": 9, "b": 9})
    waiting = Request("w", [4, 5, 6], GREEDY, max_tokens=40)
    sched.add(waiting)
    a.draft_token_ids = [11, 12, 13, 14]
    by_id = {s.request.request_id: s for s in sched.schedule().scheduled}
    assert by_id["w"].num_new_tokens == 3 and by_id["a"].num_draft_tokens == 6 - 3 - 2
    # 2 blocks free, 2 running: a draft needing a third block of a's is refused
    blocks2 = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched2 = Scheduler(SchedulerConfig(max_rows_with_drafts=16), blocks2)
    c, d = _decoding("c", blocks2), _decoding("d", blocks2)
    sched2.running = [c, d]
    c.draft_token_ids = [1, 2]
    only = sched2.schedule().scheduled
    assert [s.num_draft_tokens for s in only] == [0, 0] and blocks2.num_free_blocks == 2


def test_a_token_and_its_drafts_are_decode_rows_that_round_trip() -> None:
    step = SeqStep(start=9, token_ids=[5, 6, 7], block_ids=[3, 4, 8], samples=True, drafts=2)
    plain = SeqStep(start=4, token_ids=[2], block_ids=[1, 2], samples=True)
    assert SeqStep.decode(SeqStep.encode([step, plain])) == [step, plain]
    backend = select_backend(torch.device("cpu"), block_size=4, dtype=torch.float32, head_dim=8)
    inputs = build_inputs([step, plain], 4, backend, lambda v: torch.tensor(v, dtype=torch.long))
    assert inputs.input_ids.tolist() == [5, 6, 7, 2]
    assert inputs.positions.tolist() == [9, 10, 11, 4]
    assert inputs.meta.num_decode_tokens == 4 and not inputs.meta.prefills
    assert inputs.meta.decode_context_lens is not None
    assert inputs.meta.decode_context_lens.tolist() == [10, 11, 12, 5]
    assert inputs.sample_indices.tolist() == [0, 1, 2, 3] and inputs.sampling == [0, 0, 0, 1]


# ---- the engine: the same output -------------------------------------------------------------------


def _engine(model: Path, device: str, k: int, **kw: object) -> LLMEngine:
    config = dict(
        model=str(model), device=device, dtype="float32", num_kv_blocks=64, block_size=4,
        max_num_batched_tokens=48, max_num_seqs=6, num_speculative_tokens=k,
    )  # fmt: skip
    return LLMEngine(EngineConfig(**{**config, **kw}))  # type: ignore[arg-type]


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[Request]:
    reqs = [engine.add_request(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    while engine.has_unfinished():
        engine.step()
    assert engine.num_free_blocks == engine.blocks.num_blocks, "blocks leaked"
    return reqs


def _repetitive_prompts(seed: int, count: int) -> list[list[int]]:
    """Prompts with repeats in them (lookups find matches from the first step)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        motif = [rng.randrange(3, 512) for _ in range(rng.randint(3, 8))]
        noise = [rng.randrange(3, 512) for _ in range(rng.randint(0, 30))]
        out.append(noise + motif * rng.randint(2, 4))
    return out


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_speculative_greedy_matches_transformers(tiny_model_factory, family: str, engine_device: str) -> None:  # type: ignore[no-untyped-def]
    model_dir: Path = tiny_model_factory(family)
    prompts = _repetitive_prompts(3, 10)
    expected = hf_greedy(model_dir, prompts, max_new_tokens=40, device=engine_device)
    engine = _engine(model_dir, engine_device, 4)
    reqs = _run(engine, prompts, [GREEDY] * len(prompts))
    assert [r.output_token_ids for r in reqs] == expected
    assert engine.drafter is not None and engine.drafter.accepted > 0, "nothing was accepted: a vacuous test"
    assert sum(r.num_preemptions for r in reqs) > 0  # the small cache preempted some mid-draft


@pytest.mark.slow
def test_tensor_parallel_ranks_verify_drafts_as_one_rank_does(tiny_llama: Path) -> None:
    """Two ranks over gloo: a step's draft rows travel in its SeqSteps (their count encoded), every
    rank runs them as decode rows, and only rank 0 verifies; a rejected draft's K/V on each rank
    lies past the request's computed tokens and is overwritten. The same greedy tokens as
    transformers, with drafts accepted and preemptions, and no rank process left behind."""
    prompts = _repetitive_prompts(5, 8)
    expected = hf_greedy(tiny_llama, prompts, max_new_tokens=40)
    before = set(child_pids(os.getpid()))
    engine = _engine(tiny_llama, "cpu", 4, tensor_parallel_size=2, num_threads=1)
    try:
        reqs = _run(engine, prompts, [GREEDY] * len(prompts))
        assert [r.output_token_ids for r in reqs] == expected
        assert engine.drafter is not None and 0 < engine.drafter.accepted < engine.drafter.drafted
        assert sum(r.num_preemptions for r in reqs) > 0
    finally:
        engine.close()
    assert set(child_pids(os.getpid())) == before, "a rank process outlived engine.close()"


def test_a_mixed_batch_gives_what_it_gives_without_drafts(tiny_llama: Path, engine_device: str) -> None:
    """Greedy requests drafting beside seeded, penalised and logprobs ones, and greedy ones that
    stop on a token or at max_tokens inside an accepted run: token for token (and logprob for
    logprob) the engine without speculative decoding."""
    prompts = _repetitive_prompts(11, 8)
    baseline = _run(_engine(tiny_llama, engine_device, 0), prompts, [GREEDY] * 8)
    stop_at = [r.output_token_ids[6] for r in baseline]
    params = [
        GREEDY,
        replace(GREEDY, max_tokens=7),
        replace(GREEDY, ignore_eos=False, stop_token_ids=(stop_at[2],)),
        replace(GREEDY, ignore_eos=False, stop_token_ids=(stop_at[3],)),
        SamplingParams(temperature=0.8, seed=7, max_tokens=30, ignore_eos=True),
        replace(GREEDY, logprobs=2),
        replace(GREEDY, frequency_penalty=0.5),
        GREEDY,
    ]
    plain = _run(_engine(tiny_llama, engine_device, 0), prompts, params)
    engine = _engine(tiny_llama, engine_device, 3)
    drafted = _run(engine, prompts, params)
    for a, b in zip(plain, drafted, strict=True):
        assert b.output_token_ids == a.output_token_ids, b.request_id
        assert b.status == a.status
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
    assert engine.drafter is not None and engine.drafter.accepted > 0
    assert drafted[2].output_token_ids[-1] == stop_at[2] and len(drafted[1].output_token_ids) == 7


def test_sampled_and_logprobs_requests_draft_and_draw_what_they_draw_without(
    tiny_llama: Path, engine_device: str
) -> None:
    """Seeded sampling (temperature, top-k, top-p, min-p) and logprobs with drafts: every token
    and logprob is the engine's without drafts, rejected drafts included (the seeded generator is
    set back to after the rows a request keeps)."""
    prompts = _repetitive_prompts(23, 6)
    params = [
        SamplingParams(temperature=0.6, seed=1, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=2, top_k=5, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=3, top_p=0.8, min_p=0.05, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=4, logprobs=3, max_tokens=40, ignore_eos=True),
        replace(GREEDY, logprobs=1),
        SamplingParams(temperature=0.3, seed=5, max_tokens=40, ignore_eos=True),
    ]
    plain = _run(_engine(tiny_llama, engine_device, 0), prompts, params)
    engine = _engine(tiny_llama, engine_device, 4, speculative_max_rows=64, num_kv_blocks=256)
    drafted = _run(engine, prompts, params)
    for a, b in zip(plain, drafted, strict=True):
        assert b.output_token_ids == a.output_token_ids, b.request_id
        assert [x.token_id for x in b.logprobs] == [x.token_id for x in a.logprobs]
        assert [x.logprob for x in b.logprobs] == pytest.approx([x.logprob for x in a.logprobs], abs=1e-5)
    drafter = engine.drafter
    assert drafter is not None and 0 < drafter.accepted < drafter.drafted  # kept and rejected drafts


def test_drafts_only_fill_a_steps_rows_up_to_the_limit(tiny_llama: Path, engine_device: str) -> None:
    """speculative_max_rows 4: no drafts while 4 or more requests decode, and with r running at
    most 4 - r drafts in a step."""
    engine = _engine(tiny_llama, engine_device, 4, speculative_max_rows=4, max_num_batched_tokens=512)
    drafter = engine.drafter
    assert drafter is not None
    lengths = [12, 16, 20, 24, 28, 40]  # they finish one after the other
    for i, (prompt, n) in enumerate(zip(_repetitive_prompts(5, 6), lengths, strict=True)):
        engine.add_request(str(i), prompt, replace(GREEDY, max_tokens=n))
    busy_steps = 0
    while engine.has_unfinished():
        running, before = len(engine.scheduler.running), drafter.drafted
        engine.step()
        busy_steps += running >= 4
        assert drafter.drafted - before <= max(0, 4 - running), f"{running} running"
    assert busy_steps > 5 and drafter.drafted > 0  # and drafts again once fewer were left


def test_the_demo_model_drafts_and_matches_transformers(demo_model_dir: Path) -> None:
    from scalellm.text import Tokenizer

    tok = Tokenizer.from_dir(demo_model_dir)
    texts = [
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
        "Repeat after me: red, green, blue, red, green, blue, red,",
        "The three primary colors are",
    ]
    prompts = [tok.encode(t) for t in texts]
    expected = hf_greedy(demo_model_dir, prompts, max_new_tokens=32)
    engine = LLMEngine(
        EngineConfig(model=str(demo_model_dir), dtype="float32", num_kv_blocks=256, num_speculative_tokens=4)
    )
    reqs = _run(engine, prompts, [replace(GREEDY, max_tokens=32)] * 3)
    assert [r.output_token_ids for r in reqs] == expected
    assert engine.drafter is not None and engine.drafter.accepted > 0


def test_speculative_decoding_needs_synchronous_steps() -> None:
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(num_speculative_tokens=2, async_scheduling=True)
    with pytest.raises(ValueError, match="prompt_lookup"):
        EngineConfig(num_speculative_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=-1)
