"""Scheduler.schedule() keeps decode steps short: prompts advance by a capped chunk while
anything decodes, and by the whole token budget when nothing does."""

from __future__ import annotations

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.request import Request
from scalellm.engine.scheduler import Scheduler, SchedulerConfig
from scalellm.types import SamplingParams


def _sched(budget: int, cap: int) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, prefill_tokens_with_decodes=cap)
    return Scheduler(config, BlockManager(256, 4))


def _req(rid: str, n: int) -> Request:
    first = 1000 * (1 + sum(map(ord, rid)))  # distinct prompts: no prefix-cache hits between them
    return Request(rid, list(range(first, first + n)), SamplingParams(), max_tokens=50)


def _tokens(s: Scheduler) -> dict[str, int]:
    out = s.schedule()
    s.update(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    return {x.request.request_id: x.num_new_tokens for x in out.scheduled}


def test_a_burst_with_nothing_decoding_fills_the_whole_budget() -> None:
    s = _sched(budget=64, cap=8)
    for i in range(3):
        s.add(_req(f"p{i}", 30))
    assert _tokens(s) == {"p0": 30, "p1": 30, "p2": 4}


def test_prompts_advance_by_the_cap_while_requests_decode() -> None:
    s = _sched(budget=64, cap=8)
    s.add(_req("a", 4))
    s.add(_req("b", 4))
    assert _tokens(s) == {"a": 4, "b": 4}  # both prefilled; they decode from now on
    s.add(_req("long", 30))
    s.add(_req("next", 5))
    assert _tokens(s) == {"a": 1, "b": 1, "long": 8}
    assert _tokens(s) == {"a": 1, "b": 1, "long": 8}
    assert _tokens(s) == {"a": 1, "b": 1, "long": 8}
    assert _tokens(s) == {"a": 1, "b": 1, "long": 6, "next": 2}  # the cap is shared by all prompts
    assert _tokens(s) == {"a": 1, "b": 1, "long": 1, "next": 3}


def test_every_decode_is_scheduled_even_beyond_the_cap() -> None:
    s = _sched(budget=64, cap=2)
    for i in range(6):
        s.add(_req(f"d{i}", 3))
    _tokens(s)
    s.add(_req("late", 10))
    got = _tokens(s)
    assert [got[f"d{i}"] for i in range(6)] == [1] * 6 and got["late"] == 2
