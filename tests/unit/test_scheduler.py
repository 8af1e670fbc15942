"""A real Scheduler over a real BlockManager, stepped without a model (tokens are made up)."""

from __future__ import annotations

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.request import Request, RequestStatus
from scalellm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from scalellm.types import SamplingParams


def _sched(num_blocks: int = 64, block_size: int = 4, budget: int = 32, seqs: int = 8) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget),
        BlockManager(num_blocks, block_size),
    )


def _req(rid: str, n: int, max_tokens: int = 8, priority: int = 0, first: int = 1000) -> Request:
    return Request(
        rid, list(range(first, first + n)), SamplingParams(), max_tokens=max_tokens, priority=priority
    )


def _step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    s.update(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    return out


def _drain(s: Scheduler, limit: int = 1000) -> int:
    steps = 0
    while s.has_work and steps < limit:
        _step(s)
        steps += 1
    assert not s.has_work
    return steps


def test_chunked_prefill_respects_the_token_budget() -> None:
    s = _sched(budget=16)
    s.add(_req("a", 40))
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens, x.samples) for x in out.scheduled] == [("a", 16, False)]
    s.update(out, {})
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 16
    s.update(out, {})
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 8 and out.scheduled[0].samples


def test_decodes_mix_with_a_new_prefill() -> None:
    s = _sched(budget=20)
    s.add(_req("a", 4))
    _step(s)  # a prefilled, sampled one token
    s.add(_req("b", 30))
    out = s.schedule()
    got = {x.request.request_id: x.num_new_tokens for x in out.scheduled}
    assert got == {"a": 1, "b": 19}
    assert out.num_batched_tokens == 20


def test_max_num_seqs_limits_the_batch() -> None:
    s = _sched(seqs=2)
    for i in range(4):
        s.add(_req(str(i), 4))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 2


def test_priority_then_fcfs() -> None:
    s = _sched(seqs=1)
    s.add(_req("late-low", 4, priority=5))
    s.add(_req("first", 4))
    s.add(_req("second", 4))
    order = []
    while s.has_work:
        out = _step(s)
        order += [x.request.request_id for x in out.scheduled if x.request.request_id not in order]
    assert order == ["first", "second", "late-low"]


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    # 8 blocks of 4: two requests of 12 tokens take 6 blocks; growing past 16 tokens each needs more.
    s = _sched(num_blocks=8, budget=64)
    a, b = _req("a", 12, max_tokens=10), _req("b", 12, max_tokens=10, first=2000)
    s.add(a)
    s.add(b)
    preempted = []
    while s.has_work:
        out = _step(s)
        preempted += [r.request_id for r in out.preempted]
    assert preempted and preempted[0] == "b"  # the later arrival goes first
    assert b.num_preemptions >= 1
    assert a.status is RequestStatus.FINISHED_LENGTH and b.status is RequestStatus.FINISHED_LENGTH
    assert a.num_output_tokens == 10 and b.num_output_tokens == 10
    assert s.blocks.num_free_blocks == 8


def test_abort_anywhere_frees_blocks() -> None:
    s = _sched(num_blocks=16, budget=8)
    s.add(_req("running", 20))
    s.add(_req("waiting", 20))
    s.schedule()  # "running" admitted, chunked
    assert s.abort("running") is not None
    assert s.abort("waiting") is not None
    assert s.abort("nope") is None
    assert s.blocks.num_free_blocks == 16
    assert {r.request_id for r in s.take_finished()} == {"running", "waiting"}


def test_no_block_leaked_after_many_requests() -> None:
    s = _sched(num_blocks=40, budget=24, seqs=5)
    for i in range(30):
        s.add(_req(str(i), 3 + (i * 7) % 25, max_tokens=1 + i % 9, first=i * 100))
    _drain(s)
    assert s.blocks.num_free_blocks == 40
    assert all(rc == 0 for rc in s.blocks.ref_counts)


def test_remote_kv_reservation_lifecycle() -> None:
    """Decode worker flow: reserve blocks, wait for remote KV, then join the batch."""
    s = _sched(num_blocks=6, block_size=4)
    big = _req("big", 30)
    assert not s.reserve_remote(big)  # 8 blocks needed, 6 exist: refused, nothing held
    assert s.blocks.num_free_blocks == 6
    r = _req("r", 10, max_tokens=3)
    assert s.reserve_remote(r)
    assert r.status is RequestStatus.WAITING_FOR_REMOTE_KVS and s.blocks.num_free_blocks == 3
    assert s.schedule().empty  # nothing runs while its KV is in flight
    s.remote_kv_ready("r", first_token=42)
    assert r.status is RequestStatus.RUNNING and r.output_token_ids == [42]
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("r", 1)]
    s.update(out, {"r": 43})
    _drain(s)
    assert r.output_token_ids == [42, 43, 7] and s.blocks.num_free_blocks == 6


def test_abort_while_waiting_for_remote_kv() -> None:
    s = _sched(num_blocks=6)
    r = _req("r", 10)
    assert s.reserve_remote(r)
    assert s.abort("r") is r
    assert r.status is RequestStatus.FINISHED_ABORTED and s.blocks.num_free_blocks == 6
