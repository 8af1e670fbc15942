"""Router and worker sources: least-loaded choice, KV room, local in-flight spreading, prefill lists."""

from __future__ import annotations

from typing import Any

import pytest

from scalellm.registry import (
    EventType,
    WorkerEvent,
    WorkerInfo,
    WorkerLoad,
    WorkerRecord,
    WorkerRole,
    WorkerView,
)
from services.gateway.prefix import RoutingMode, RoutingPolicy
from services.gateway.request import ErrorKind, GatewayError
from services.gateway.routing import RegistryWorkers, Router, StaticWorkers, WorkerEndpoint, WorkerSet


class FixedSource:
    def __init__(self, workers: WorkerSet) -> None:
        self.workers = workers

    def current(self) -> WorkerSet:
        return self.workers


def ep(wid: str, role: WorkerRole = WorkerRole.DECODE, **load: float) -> WorkerEndpoint:
    return WorkerEndpoint(worker_id=wid, address=f"{wid}:1", role=role, block_size=16, **load)  # type: ignore[arg-type]


def router(decode: list[WorkerEndpoint], prefill: list[WorkerEndpoint] = (), **kw: Any) -> Router:  # type: ignore[assignment]
    return Router(FixedSource(WorkerSet(tuple(decode), tuple(prefill))), **kw)


def test_least_loaded_decode_worker_wins() -> None:
    r = router(
        [
            ep("a", running=5, free_blocks=100, reported_at=1),
            ep("b", running=1, waiting=1, free_blocks=100, reported_at=1),
        ]
    )
    assert r.route(10).decode.worker_id == "b"


def test_ties_prefer_more_free_blocks() -> None:
    r = router([ep("a", free_blocks=10, reported_at=1), ep("b", free_blocks=50, reported_at=1)])
    assert r.route(10).decode.worker_id == "b"


def test_workers_without_room_come_last() -> None:
    # "a" is idle but reports 1 free block; a 40-token prompt needs 3 blocks of 16.
    r = router([ep("a", free_blocks=1, reported_at=1), ep("b", running=9, free_blocks=20, reported_at=1)])
    assert r.route(40).decode.worker_id == "b"
    assert r.route(40, exclude={"b"}).decode.worker_id == "a"  # stale reports: still tried, last
    assert r.route(40, exclude={"a", "b"}) is None


def test_local_inflight_spreads_a_burst_before_reports_catch_up() -> None:
    r = router([ep("a", free_blocks=100, reported_at=1), ep("b", free_blocks=100, reported_at=1)])
    leases = []
    for _ in range(6):
        route = r.route(16)
        leases.append(r.acquire(route, 16))
    assert r.inflight("a") == 3 and r.inflight("b") == 3
    for lease in leases:
        lease.release()
        lease.release()  # idempotent
    assert r.inflight("a") == 0 and r.inflight("b") == 0


def test_fresh_report_resets_the_local_correction() -> None:
    source = FixedSource(
        WorkerSet(
            (ep("a", reported_at=1, free_blocks=100), ep("b", running=3, reported_at=1, free_blocks=100))
        )
    )
    r = Router(source)
    lease = r.acquire(r.route(16), 16)
    assert lease.route.decode.worker_id == "a"
    r.acquire(r.route(16), 16)  # a: 0 + 1 local = 1 < b: 3
    assert r.inflight("a") == 2
    # A new report from "a" already counts our two requests: the local correction starts again at 0,
    # so a is 2 (not 2 + 2) and still below b's 3.
    source.workers = WorkerSet((ep("a", running=2, reported_at=2, free_blocks=98), source.workers.decode[1]))
    assert r.route(16).decode.worker_id == "a"
    r.acquire(r.route(16), 16)  # a: 2 + 1 local = 3 ties b, and b has more free blocks
    assert r.route(16).decode.worker_id == "b"
    lease.release()  # one of ours finished since the report: a's estimate drops to 2
    assert r.route(16).decode.worker_id == "a"


def test_free_block_estimate_counts_our_reservations() -> None:
    r = router([ep("a", free_blocks=4, reported_at=1), ep("b", running=3, free_blocks=100, reported_at=1)])
    r.acquire(r.route(64), 64)  # takes a's 4 blocks
    assert r.route(64).decode.worker_id == "b"


@pytest.mark.parametrize("mode", list(RoutingMode))
def test_prefill_workers_least_loaded_first_and_capped(mode: RoutingMode) -> None:
    prefill = [ep(f"p{i}", WorkerRole.PREFILL, running=i, reported_at=1) for i in (3, 0, 1)]
    decode = [ep("d", free_blocks=1000, reported_at=1)]
    r = router(decode, prefill, prefill_fallbacks=2, policy=RoutingPolicy(mode=mode))
    route = r.route(1000)
    assert [p.worker_id for p in route.prefill] == ["p0", "p1"]
    r.acquire(route, 1000).prefilled()  # its first token came: only its queue place counts now
    r.acquire(r.route(1000), 1000).prefilled()  # p0: 0 + 1 ties p1: 1, and stays first
    assert r.inflight("p0") == 2
    assert [p.worker_id for p in r.route(1000).prefill] == ["p1", "p0"]  # p0 is now the busier


def test_colocated_without_prefill_workers_and_for_short_prompts_under_load_routing() -> None:
    assert router([ep("d", reported_at=1)]).route(10).prefill == ()
    both = ep("d", WorkerRole.BOTH, reported_at=1)
    load = RoutingPolicy(mode=RoutingMode.LOAD)
    r = router([both], [ep("p", WorkerRole.PREFILL)], colocate_below_tokens=32, policy=load)
    assert r.route(10).prefill == () and [p.worker_id for p in r.route(100).prefill] == ["p"]


def test_no_decode_worker_is_unavailable() -> None:
    with pytest.raises(GatewayError) as err:
        router([], [ep("p", WorkerRole.PREFILL)]).route(10)
    assert err.value.kind is ErrorKind.UNAVAILABLE and not router([]).can_serve()


def test_static_workers_parse_ids_and_count_inflight_only() -> None:
    source = StaticWorkers(["127.0.0.1:5", "d1=10.0.0.2:6"], ["p=10.0.0.3:7"])
    workers = source.current()
    assert [(w.worker_id, w.address) for w in workers.decode] == [
        ("127.0.0.1:5", "127.0.0.1:5"),
        ("d1", "10.0.0.2:6"),
    ]
    assert workers.prefill[0].worker_id == "p" and workers.decode[0].free_blocks is None
    r = Router(source)
    r.acquire(r.route(1000), 1000)
    assert r.route(1000).decode.worker_id == "d1"
    with pytest.raises(ValueError, match="host:port"):
        StaticWorkers(["nonsense"])


def record(wid: str, role: WorkerRole, running: int = 0, updated: float = 1.0) -> WorkerRecord:
    info = WorkerInfo(
        worker_id=wid, role=role, model="m", grpc_address=f"{wid}:1", kv_capacity_blocks=100, kv_block_size=16
    )
    return WorkerRecord(info=info, load=WorkerLoad(running=running, free_blocks=90, updated_at=updated))


def test_registry_workers_follow_the_view() -> None:
    view = WorkerView(client=None, model="m")  # type: ignore[arg-type] - fed by apply(), never started
    source = RegistryWorkers(view)
    assert source.current().decode == () and source.current().blocks is view.blocks
    snapshot = (
        record("both", WorkerRole.BOTH),
        record("dec", WorkerRole.DECODE, 3),
        record("pre", WorkerRole.PREFILL),
    )
    view.apply(WorkerEvent(type=EventType.SNAPSHOT, snapshot=snapshot, lease_s=10))
    workers = source.current()
    assert [w.worker_id for w in workers.decode] == ["both", "dec"] and [
        w.worker_id for w in workers.prefill
    ] == ["pre"]
    assert (
        workers.decode[1].running == 3 and workers.decode[1].free_blocks == 90 and source.current() is workers
    )
    view.apply(WorkerEvent(type=EventType.LEFT, worker_id="both", worker=snapshot[0]))
    assert [w.worker_id for w in source.current().decode] == ["dec"]
    r = Router(source)
    assert r.route(10).decode.worker_id == "dec"
