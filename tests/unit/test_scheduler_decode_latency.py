"""Scheduler.schedule() keeps decode steps short: prompts advance by a capped chunk while
anything decodes, and by the whole token budget when nothing does."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_the_engine_setting_reaches_the_scheduler(tiny_llama: Path) -> None:
    """EngineConfig.max_prefill_tokens_with_decodes: a 16-token prompt arriving while another
    request decodes gets its first token after 16 / cap steps."""
    from scalellm.engine.config import EngineConfig
    from scalellm.engine.engine import LLMEngine

    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    steps_to_first_token = []
    for cap in (4, 16):
        engine = LLMEngine(
            EngineConfig(
                model=str(tiny_llama), device="cpu", num_kv_blocks=64, block_size=4,
                max_prefill_tokens_with_decodes=cap,
            )
        )  # fmt: skip
        engine.add(engine.make_request("decoding", [5, 6, 7], greedy))
        engine.step()  # prefilled: it decodes from now on
        engine.add(engine.make_request("late", list(range(100, 116)), greedy))
        steps = 0
        while not any(e.request_id == "late" for e in engine.step()):
            steps += 1
        steps_to_first_token.append(steps + 1)
        engine.close()
    assert steps_to_first_token == [4, 1]


def test_a_cap_below_one_is_refused_with_the_setting_named() -> None:
    from scalellm.engine.config import EngineConfig
    from scalellm.registry import WorkerRole
    from scalellm.worker.config import parse_worker_args

    with pytest.raises(ValueError, match="max_prefill_tokens_with_decodes"):
        EngineConfig(max_prefill_tokens_with_decodes=0)
    config = parse_worker_args(["--max-prefill-tokens-with-decodes", "2048"], (WorkerRole.BOTH,), environ={})
    assert config.engine.max_prefill_tokens_with_decodes == 2048
