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
    s.add(_req("o1", OTHER))
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
