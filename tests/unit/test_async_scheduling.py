"""Async scheduling (EngineConfig.async_scheduling) on a real engine (tiny random Llama, CPU):
each step's forward pass is launched before the previous step's tokens are applied, its pending
rows fed on the device. What a caller sees must not change: the same tokens, logprobs, finish
reasons and events as the synchronous engine, through stops, aborts, preemption, prefill-only
requests, grammars, penalties and prompt logprobs; and every block comes back."""

from __future__ import annotations

import os
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.request import PENDING_TOKEN, Request, RequestStatus
from scalellm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from scalellm.types import FinishReason, SamplingParams, StructuredOutput

BLOCK = 4


DEVICE = os.environ.get("SCALELLM_TEST_DEVICE", "cpu")
"""cuda on a GPU machine (bench/gpu_suite.sh's exact stage): decode steps then replay CUDA graphs."""


def _engine(
    model: Path, overlap: bool, blocks: int = 96, budget: int = 32, graphs: int | None = None
) -> LLMEngine:
    """``graphs``: cuda_graph_max_batch (None: 0 on CPU, 8 on CUDA, where capturing every bucket
    up to 256 would cost each engine seconds; on CPU a positive one runs decode steps through the
    graphs' bucketed static buffers without capture)."""
    if graphs is None and DEVICE.startswith("cuda"):
        graphs = 8
    return LLMEngine(
        EngineConfig(
            model=str(model),
            dtype="float32",
            device=DEVICE,
            num_kv_blocks=blocks,
            block_size=BLOCK,
            max_num_batched_tokens=budget,
            max_prefill_tokens_with_decodes=16,
            async_scheduling=overlap,
            cuda_graph_max_batch=graphs,
        )
    )


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


_reported: dict[int, int] = {}
"""id of a request's event list in _run's result -> num_output_tokens of its outcome"""

Workload = list[tuple[int, str, list[int], SamplingParams]]
"""(step at which it arrives, id, prompt, params)"""


def _run(engine: LLMEngine, workload: Workload, abort: dict[str, int] | None = None) -> dict[str, list]:
    """Step the engine through the workload; per request: its events as (token, logprobs, finish
    reason). ``abort``: request id -> step at which the caller aborts it."""
    seen: dict[str, list] = {}
    overlapped_steps = 0
    step = 0
    pending = sorted(workload, key=lambda w: w[0])
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for rid, at in (abort or {}).items():
            if at == step:
                engine.abort_request(rid)
        for e in engine.step():
            reason = e.outcome.finish_reason if e.outcome is not None else None
            seen.setdefault(e.request_id, []).append((e.token_id, e.logprobs, reason))
            if e.outcome is not None:
                _reported[id(seen[e.request_id])] = e.outcome.num_output_tokens
        overlapped_steps += any(r.awaiting_token for r in engine.scheduler.running)
        step += 1
        assert step < 500, "the engine does not finish"
    assert engine.num_free_blocks == engine.num_blocks, "blocks leaked"
    if engine.config.async_scheduling:  # every step that samples leaves its tokens pending
        assert overlapped_steps >= step - 2, (overlapped_steps, step)
    else:
        assert overlapped_steps == 0
    return seen


def _both(model: Path, workload: Workload, **kw) -> tuple[dict[str, list], dict[str, list]]:  # type: ignore[no-untyped-def]
    abort = kw.pop("abort", None)
    return _run(_engine(model, False, **kw), workload, abort), _run(
        _engine(model, True, **kw), workload, abort
    )


def _tokens(events: list) -> list[int]:
    return [t for t, _, _ in events if t is not None]


@pytest.mark.parametrize("graphs", [None, 8])
def test_async_steps_give_the_synchronous_engines_events(tiny_llama: Path, graphs: int | None) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    probe = _run(_engine(tiny_llama, False), [(0, "probe", _prompt(5, 9), greedy)])
    out = _tokens(probe["probe"])
    first = next(i for i, t in enumerate(out) if i >= 2 and t not in out[:i])  # reached mid-way
    stop_at = out[first]
    workload: Workload = [
        (0, "long", _prompt(1, 50), greedy),  # chunked prefill: 50 tokens over a 32-token budget
        (0, "one", _prompt(2, 7), SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)),
        (0, "two", _prompt(3, 12), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)),
        (1, "stops", _prompt(5, 9), replace(greedy, ignore_eos=False, stop_token_ids=(stop_at,))),
        (2, "seeded", _prompt(6, 10), SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=9)),
        (4, "late", _prompt(7, 21), greedy),
        (4, "shared", [*_prompt(1, 50)[:24], 9, 9], greedy),  # a prefix-cache hit on "long"'s blocks
    ]
    sync, overlapped = _both(tiny_llama, workload, graphs=graphs)
    assert overlapped == sync
    assert sync["stops"][-1][2] is FinishReason.STOP and _tokens(sync["stops"]) == out[: first + 1]
    assert len(_tokens(sync["one"])) == 1 and len(_tokens(sync["two"])) == 2


def test_grammars_bad_words_and_prompt_logprobs_overlap_too(tiny_chat_model: Path) -> None:
    """What reads a request's tokens on the host (a grammar's next mask, bad words of two tokens,
    penalties) runs after the previous step's tokens are applied, so these requests keep their
    steps in flight like any other; prompt logprobs are computed while sampling. The events equal
    the synchronous engine's."""
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    regex = StructuredOutput.regex("(ab|cd)[0-9]{3,6}")
    workload: Workload = [
        (0, "a", _prompt(11, 13), greedy),
        (0, "regex", _prompt(10, 6), SamplingParams(temperature=0.0, max_tokens=20, structured_output=regex)),
        (
            1,
            "json",
            _prompt(9, 7),
            SamplingParams(temperature=0.0, max_tokens=16, structured_output=StructuredOutput.json_object()),
        ),
        (2, "penalty", _prompt(14, 8), replace(greedy, presence_penalty=1.5, frequency_penalty=0.5)),
        (3, "words", _prompt(13, 8), replace(greedy, max_tokens=5, bad_words_token_ids=((7, 8),))),
        (
            4,
            "drawn",
            _prompt(8, 9),
            SamplingParams(temperature=1.0, seed=3, max_tokens=12, structured_output=regex),
        ),
        (9, "prompt", _prompt(15, 8), SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1)),
        (12, "c", _prompt(16, 9), greedy),
    ]
    sync, overlapped = _both(tiny_chat_model, workload)
    assert overlapped == sync
    tokenizer = Tokenizer.from_file(str(tiny_chat_model / "tokenizer.json"))
    for rid in ("regex", "drawn"):
        assert overlapped[rid][-1][2] is FinishReason.STOP, "the grammar completes"
        assert re.fullmatch(regex.spec, tokenizer.decode(_tokens(overlapped[rid]))), rid


def test_penalties_logit_bias_and_min_tokens_give_the_synchronous_engines_events(tiny_llama: Path) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    penalties = replace(greedy, presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.4)
    workload: Workload = [
        (0, "penalties", _prompt(71, 9), penalties),
        (0, "plain", _prompt(71, 9), greedy),
        (1, "drawn", _prompt(72, 8), replace(penalties, temperature=0.8, seed=11)),
        (2, "bias", _prompt(73, 7), replace(greedy, logit_bias=((9, 5.0), (10, -3.0)), min_tokens=4)),
        (
            2,
            "words",
            _prompt(74, 7),
            replace(greedy, bad_words_token_ids=((9,), (12,)), frequency_penalty=2.0),
        ),
    ]
    sync, overlapped = _both(tiny_llama, workload)
    assert overlapped == sync
    assert _tokens(overlapped["penalties"]) != _tokens(overlapped["plain"])  # they bite


def test_logprobs_give_the_synchronous_engines_events(tiny_llama: Path) -> None:
    workload: Workload = [
        (
            0,
            "top3",
            _prompt(17, 9),
            SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True),
        ),
        (1, "chosen", _prompt(18, 7), SamplingParams(temperature=0.7, seed=5, max_tokens=5, logprobs=0)),
        (2, "plain", _prompt(19, 8), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)),
    ]
    sync, overlapped = _both(tiny_llama, workload)
    assert overlapped == sync
    assert all(lp is not None and len(lp.top) == 3 for _, lp, _ in overlapped["top3"])
    assert all(lp is not None and lp.top == () for _, lp, _ in overlapped["chosen"])


def test_an_abort_drops_the_pending_token(tiny_llama: Path) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    workload: Workload = [(0, "kept", _prompt(21, 10), greedy), (0, "cut", _prompt(22, 10), greedy)]
    sync, overlapped = _both(tiny_llama, workload, abort={"cut": 6})
    assert overlapped["kept"] == sync["kept"]
    # the caller aborts before step 6: the synchronous engine has applied step 5's token, the
    # overlapped one only step 4's (step 5's was pending and is dropped); no token is made up
    cut, cut_sync = _tokens(overlapped["cut"]), _tokens(sync["cut"])
    assert 0 < len(cut) <= len(cut_sync) < 16 and cut == cut_sync[: len(cut)]
    assert overlapped["cut"][-1] == (None, None, FinishReason.ABORT)
    assert _reported[id(overlapped["cut"])] == len(cut)  # its usage counts no placeholder


def test_preemption_recomputes_with_the_pending_token_filled_in(tiny_llama: Path) -> None:
    """So few blocks that the running requests preempt each other while tokens are pending."""
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    workload: Workload = [(0, f"r{i}", _prompt(30 + i, 14), greedy) for i in range(4)]
    engine = _engine(tiny_llama, True, blocks=22)
    preempt, pending_then = engine.scheduler._preempt, []

    def watched(req: Request, *args):  # type: ignore[no-untyped-def]
        pending_then.append(req.awaiting_token)
        return preempt(req, *args)

    engine.scheduler._preempt = watched  # type: ignore[method-assign,assignment]
    overlapped = _run(engine, workload)
    assert any(pending_then), "no request was preempted while its token was pending"
    sync = _run(_engine(tiny_llama, False, blocks=22), workload)
    assert overlapped == sync
    assert all(len(_tokens(v)) == 20 for v in sync.values())


def _prefill_only(model: Path, overlap: bool) -> int | None:
    """A prefill-only request beside a decoding one: its first token, after checking that it
    ran no row past its prompt and kept its blocks until released."""
    engine = _engine(model, overlap)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    req = engine.make_request("p", _prompt(41, 11), greedy, prefill_only=True)
    engine.add(req)
    engine.add_request("other", _prompt(42, 5), greedy)
    schedule, rows = engine.scheduler.schedule, list[int]()

    def watched() -> SchedulerOutput:
        out = schedule()
        rows.extend(s.num_new_tokens for s in out.scheduled if s.request is req)
        return out

    engine.scheduler.schedule = watched  # type: ignore[method-assign]
    events = []
    while engine.has_unfinished():
        events += [e for e in engine.step() if e.request_id == "p"]
    assert [e.finished for e in events] == [True]
    assert rows == [11], "its pending token is its last: no decode row after the prompt"
    assert req.num_tokens == 12 and PENDING_TOKEN not in req.token_ids
    assert events[0].outcome is not None and events[0].outcome.kept_block_ids
    assert engine.num_free_blocks < engine.num_blocks
    engine.release("p")
    assert engine.num_free_blocks == engine.num_blocks
    return events[0].token_id


def test_prefill_only_requests_sample_once_and_keep_their_blocks(tiny_llama: Path) -> None:
    assert _prefill_only(tiny_llama, True) == _prefill_only(tiny_llama, False)


def test_a_pending_token_that_stops_a_preempted_request_finishes_it() -> None:
    """Scheduler level: the token of a request preempted while it was pending is filled in
    from the waiting queue; a stop there finishes the request and leaves the queue."""
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32), BlockManager(16, 4))
    req = Request("r", [5, 6, 7], SamplingParams(stop_token_ids=(99,)), max_tokens=8)
    s.add(req)
    out = s.schedule()
    s.advance(out)
    req.append_pending()
    assert s.schedule().scheduled[0].num_new_tokens == 1  # decodes its pending token
    s.running.remove(req)
    s._preempt(req, {}, s.schedule())  # as schedule() does when blocks run out
    assert req.status is RequestStatus.PREEMPTED and req in s.waiting
    assert s.schedule().empty  # not admitted again while its token is pending
    assert s.add_tokens([(req, 99)]) == [(req, 99)]
    assert req.status is RequestStatus.FINISHED_STOPPED and not s.waiting and req.token_ids[-1] == 99
    assert s.take_finished() == [req] and s.blocks.num_free_blocks == 16


def test_a_cpu_engine_warns_that_async_scheduling_only_delays_its_tokens(
    tiny_llama: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if DEVICE != "cpu":
        pytest.skip("a CPU engine's warning")
    _engine(tiny_llama, False)
    assert "async scheduling" not in caplog.text
    _engine(tiny_llama, True)
    assert "async scheduling on a CPU overlaps nothing" in caplog.text


def test_async_scheduling_is_refused_under_tensor_parallelism() -> None:
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(device="cpu", tensor_parallel_size=2, async_scheduling=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_launch_does_not_wait_for_the_device(tiny_chat_model: Path) -> None:
    """Overlap needs a forward pass and a sampling that never synchronize with the device (a
    pageable host-to-device copy, a .tolist(), an .item() would): CUDA's sync debug mode turns
    any such call into an error, here for decode steps (graph replay), a step with a prefill
    chunk, and a request that draws its tokens (temperature, top-k, top-p, min-p, a seed), one
    with logprobs, one with penalties, a logit bias, min_tokens and bad words of one and two
    tokens, and one with a grammar, beside greedy ones (the demo tokenizer: on a GPU machine
    SCALELLM_TEST_TOKENIZER_DIR points at its files, bench/gpu_prep.sh)."""
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_chat_model),
            dtype="float32",
            device="cuda",
            num_kv_blocks=96,
            block_size=BLOCK,
            async_scheduling=True,
            cuda_graph_max_batch=8,
        )
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", _prompt(50 + i, 9), greedy)
    drawn = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, seed=3, max_tokens=12)
    engine.add_request("drawn", _prompt(53, 9), drawn)
    engine.add_request("logprobs", _prompt(54, 9), replace(greedy, logprobs=2))
    controls = replace(
        greedy, presence_penalty=0.5, repetition_penalty=1.2, logit_bias=((9, 2.0),), min_tokens=3
    )
    engine.add_request("controls", _prompt(55, 9), replace(controls, bad_words_token_ids=((12,), (7, 8))))
    regex = StructuredOutput.regex("(ab|cd)[0-9]{3,6}")
    engine.add_request("grammar", _prompt(56, 9), SamplingParams(max_tokens=12, structured_output=regex))
    for _ in range(3):
        engine.step()  # prefill and the first decodes, compiling whatever compiles on first use
    engine.add_request("late", _prompt(60, 9), greedy)
    checked: list[str] = []

    def strict(name: str):  # type: ignore[no-untyped-def]
        method = getattr(engine.runner, name)

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(name)

        setattr(engine.runner, name, run)

    strict("forward")
    strict("sample")
    while engine.has_unfinished():
        engine.step()
    assert checked.count("forward") >= 9 and checked.count("sample") >= 9
