"""The scheduler's waiting queue is fair across tenants: a real Scheduler over a real
BlockManager, stepped without a model (tokens are made up), with one sequence slot so the order
in which waiting requests are admitted is plain to see."""

from __future__ import annotations

import math

import pytest

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.request import Request
from scalellm.engine.scheduler import Scheduler, SchedulerConfig
from scalellm.types import DEFAULT_TENANT, InvalidParameter, SamplingParams, TenantShare
from scalellm.types.proto import tenant_from_proto

FLOOD, OTHER = TenantShare("flood"), TenantShare("other")


def _req(rid: str, tenant: TenantShare, priority: int = 0) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(), max_tokens=1, priority=priority, tenant=tenant)


def _admission_order(s: Scheduler) -> list[str]:
    """Run to the end; the ids in the order they were admitted (one slot: one at a time)."""
    order: list[str] = []
    while s.has_work:
        out = s.schedule()
        order += [x.request.request_id for x in out.scheduled if x.request.request_id not in order]
        s.update(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    return order


def _sched() -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64), BlockManager(64, 4))


def test_a_flooding_tenant_does_not_hold_back_a_later_one() -> None:
    s = _sched()
    for i in range(8):
        s.add(_req(f"f{i}", FLOOD))
    s.add(_req("o0", OTHER))
    s.add(_long("o1", OTHER))
    order = _admission_order(s)
    # FCFS would run o0 and o1 ninth and tenth; fair shares alternate from the start.
    assert order[:4] == ["f0", "o0", "f1", "o1"], order
    assert order[4:] == [f"f{i}" for i in range(2, 8)]


def test_weights_set_the_shares_and_priority_orders_within_a_tenant() -> None:
    s = _sched()
    heavy = TenantShare("heavy", 2.0)
    for i in range(6):
        s.add(_req(f"h{i}", heavy))
        s.add(_req(f"l{i}", TenantShare("light", 1.0), priority=1 if i == 0 else 0))
    order = _admission_order(s)
    # heavy gets two turns for light's one (a tie goes to the earlier arrival); light's
    # priority-1 request l0 goes after its others.
    assert order[:9] == ["h0", "l1", "h1", "h2", "l2", "h3", "l3", "h4", "h5"], order
    assert order[-1] == "l0"


def test_one_tenant_keeps_priority_then_arrival_order() -> None:
    s = _sched()
    for i, priority in enumerate([2, 0, 1, 0]):
        s.add(_req(f"r{i}", OTHER, priority))
    assert _admission_order(s) == ["r1", "r3", "r2", "r0"]


def test_the_wire_tenant_fields() -> None:
    assert tenant_from_proto("", 0.0) is DEFAULT_TENANT
    assert tenant_from_proto("acme", 0.0) == TenantShare("acme", 1.0)
    assert tenant_from_proto("acme", 2.5) == TenantShare("acme", 2.5)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(InvalidParameter, match="tenant_weight"):
            tenant_from_proto("acme", bad)


def _run_until(s: Scheduler, rid: str, limit: int = 200) -> tuple[int, list[str]]:
    """Step until rid is scheduled: how many steps that took, and who was preempted meanwhile."""
    preempted: list[str] = []
    for step in range(1, limit):
        out = s.schedule()
        preempted += [r.request_id for r in out.preempted]
        s.update(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
        if any(x.request.request_id == rid for x in out.scheduled):
            return step, preempted
    raise AssertionError(f"{rid} never scheduled")


def _long(rid: str, tenant: TenantShare) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(), max_tokens=100, tenant=tenant)


def _full_batch(tenant: TenantShare, seqs: int = 4, queued: int = 8) -> Scheduler:
    """seqs running requests of one tenant that will decode for long, more of them queued."""
    s = Scheduler(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=64), BlockManager(256, 4))
    for i in range(seqs + queued):
        s.add(_long(f"f{i}", tenant))
    for _ in range(3):
        s.update(s.schedule(), {f"f{i}": 7 for i in range(seqs)})
    assert [r.request_id for r in s.running] == [f"f{i}" for i in range(seqs)]
    return s


def test_a_full_batch_makes_room_for_a_tenant_under_its_share() -> None:
    s = _full_batch(FLOOD)
    s.add(_long("o0", OTHER))
    steps, preempted = _run_until(s, "o0")
    # Admitted in the next step, not after a flood request's 100 tokens: the newest flood request
    # gave up its slot (it is recomputed later).
    assert (steps, preempted) == (1, ["f3"])
    assert len(s.running) == 4
    s.add(_long("o1", OTHER))
    steps, preempted = _run_until(s, "o1")
    assert (steps, preempted) == (1, ["f2"])  # other's share of 4 slots is 2
    s.add(_long("o2", OTHER))
    for _ in range(3):  # at its share: it waits for a slot like anyone
        out = s.schedule()
        assert not out.preempted and "o2" not in {x.request.request_id for x in out.scheduled}
        s.update(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})


def test_one_tenant_never_preempts_for_fairness() -> None:
    s = _full_batch(FLOOD)
    s.add(_req("late", FLOOD, priority=-1))
    for _ in range(5):
        out = s.schedule()
        assert not out.preempted and "late" not in {x.request.request_id for x in out.scheduled}
        s.update(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
