"""RegistryStore, WorkerWatch and the view state driven directly on a real redis-server (no gRPC)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from scalellm.kvhash import BlockHashDelta
from scalellm.redis_server import RedisServer
from scalellm.registry import (
    BackendUnavailable,
    EventType,
    InvalidRegistration,
    LeaseSuperseded,
    LeaseUnknown,
    WorkerEvent,
    WorkerInfo,
    WorkerLoad,
    WorkerRecord,
    WorkerRole,
)
from scalellm.registry.backend import redact_url
from scalellm.registry.store import RegistryStore
from scalellm.registry.validation import validate_worker_info
from scalellm.registry.view_state import ViewState
from scalellm.registry.watch import WorkerWatch

LEASE_S = 0.5
INFO = WorkerInfo(
    worker_id="decode-0",
    role=WorkerRole.DECODE,
    model="smol",
    grpc_address="127.0.0.1:50061",
    transfer_endpoint="127.0.0.1:29500",
    kv_capacity_blocks=1024,
    kv_block_size=16,
)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the module; each test gets its own key namespace."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RegistryStore]:
    store = RegistryStore(redis_server.url, lease_s=LEASE_S, namespace=f"test-{uuid.uuid4().hex[:8]}")
    yield store
    await store.aclose()


async def test_register_writes_versioned_key_under_lease(
    store: RegistryStore, redis_server: RedisServer
) -> None:
    lease = await store.register(INFO, WorkerLoad(running=1))
    assert (
        lease.worker_id == "decode-0"
        and lease.lease_id
        and lease.heartbeat_interval_s == pytest.approx(LEASE_S / 3)
    )
    key = f"{store.keys.namespace}:v1:worker:decode-0"
    async with aioredis.Redis.from_url(redis_server.url) as redis:
        assert 0 < await redis.pttl(key) <= LEASE_S * 1000
        assert await redis.hget(key, "lease") == lease.lease_id.encode()
        assert await redis.zscore(f"{store.keys.namespace}:v1:workers", "decode-0")
    (record,) = await store.list_workers()
    assert record.info == INFO and record.load.running == 1 and record.load.updated_at > 0


async def test_list_filters_by_model_and_role(store: RegistryStore) -> None:
    await store.register(INFO)
    await store.register(replace(INFO, worker_id="p", role=WorkerRole.PREFILL))
    await store.register(replace(INFO, worker_id="o", model="other"))
    assert [r.worker_id for r in await store.list_workers()] == ["decode-0", "o", "p"]
    assert [r.worker_id for r in await store.list_workers(model="smol")] == ["decode-0", "p"]
    assert [r.worker_id for r in await store.list_workers(role=WorkerRole.PREFILL)] == ["p"]


async def _redis_now_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return seconds * 1000 + micros // 1000


async def _until_redis_clock_passes(redis: aioredis.Redis, deadline_ms: int) -> None:
    """Wait (on Redis's own clock, which leases use) until deadline_ms is in the past."""

    async def passed() -> None:
        while await _redis_now_ms(redis) <= deadline_ms:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(passed(), 30)  # a hang guard only


async def test_heartbeat_renews_and_reports_load(redis_server: RedisServer) -> None:
    """A lease about to run out is renewed by a heartbeat: it outlives its old deadline."""
    store = RegistryStore(redis_server.url, lease_s=30, namespace=f"test-{uuid.uuid4().hex[:8]}")
    lease = await store.register(INFO)
    key, index = f"{store.keys.namespace}:v1:worker:decode-0", f"{store.keys.namespace}:v1:workers"
    async with aioredis.Redis.from_url(redis_server.url) as redis:
        soon = await _redis_now_ms(redis) + 50  # the lease nearly ran out
        await redis.pexpireat(key, soon)
        await redis.zadd(index, {"decode-0": soon})
        await store.heartbeat("decode-0", lease.lease_id, WorkerLoad(waiting=2, free_blocks=5))
        await _until_redis_clock_passes(redis, soon)
        assert await store.reap_expired() == []
        assert 25_000 < await redis.pttl(key) <= 30_000
    (record,) = await store.list_workers()
    assert (record.load.waiting, record.load.free_blocks) == (2, 5)
    await store.aclose()


async def _until_lease_over(store: RegistryStore, redis_server: RedisServer, worker_id: str) -> None:
    """Wait until Redis itself has expired the worker's registration (its lease ran out)."""
    async with aioredis.Redis.from_url(redis_server.url) as redis:

        async def expired() -> None:
            while await redis.exists(f"{store.keys.namespace}:v1:worker:{worker_id}"):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(expired(), 30)  # a hang guard only


async def test_lease_expires_exactly_once_across_replicas(
    store: RegistryStore, redis_server: RedisServer
) -> None:
    replica = RegistryStore(redis_server.url, lease_s=LEASE_S, namespace=store.keys.namespace)
    await store.register(INFO)
    await _until_lease_over(store, redis_server, "decode-0")
    reaped = await asyncio.gather(store.reap_expired(), replica.reap_expired())
    assert sorted(reaped) == [[], ["decode-0"]]
    assert await store.list_workers() == []
    with pytest.raises(LeaseUnknown, match="register again"):
        await store.heartbeat("decode-0", "whatever", WorkerLoad())
    await replica.aclose()


async def test_reregistration_supersedes_the_old_lease(store: RegistryStore) -> None:
    old = await store.register(INFO)
    new = await store.register(replace(INFO, version="2"))
    with pytest.raises(LeaseSuperseded):
        await store.heartbeat("decode-0", old.lease_id, WorkerLoad())
    assert not await store.deregister("decode-0", old.lease_id)
    assert [r.info.version for r in await store.list_workers()] == ["2"]
    assert await store.deregister("decode-0", new.lease_id)
    assert not await store.deregister("decode-0", new.lease_id)  # idempotent
    assert await store.list_workers() == []


async def test_subscription_sees_every_change_in_order(
    store: RegistryStore, redis_server: RedisServer
) -> None:
    async with store.subscribe() as subscription:
        lease = await store.register(INFO)
        await store.heartbeat("decode-0", lease.lease_id, WorkerLoad(running=4))
        await store.deregister("decode-0", lease.lease_id)
        await store.register(replace(INFO, worker_id="silent"))
        await _until_lease_over(store, redis_server, "silent")
        assert await store.reap_expired() == ["silent"]
        messages = [await asyncio.wait_for(anext(subscription), 30) for _ in range(5)]
    assert [(m.type, m.worker_id) for m in messages] == [
        (EventType.JOINED, "decode-0"),
        (EventType.LOAD, "decode-0"),
        (EventType.LEFT, "decode-0"),
        (EventType.JOINED, "silent"),
        (EventType.EXPIRED, "silent"),
    ]
    assert messages[0].record is not None and messages[0].record.info == INFO
    assert messages[1].load is not None and messages[1].load.running == 4


async def test_watch_starts_with_snapshot_and_filters_by_model(store: RegistryStore) -> None:
    await store.register(INFO)
    await store.register(replace(INFO, worker_id="x", model="other"))
    events = WorkerWatch(store, model="smol").events()
    snapshot = await asyncio.wait_for(anext(events), 30)
    assert snapshot.type is EventType.SNAPSHOT and [r.worker_id for r in snapshot.snapshot] == ["decode-0"]
    await store.register(replace(INFO, worker_id="y", model="other"))  # filtered out
    lease = await store.register(replace(INFO, worker_id="z"))
    await store.heartbeat("z", lease.lease_id, WorkerLoad(running=9))
    joined, load = [await asyncio.wait_for(anext(events), 30) for _ in range(2)]
    assert (joined.type, joined.worker_id, load.type) == (EventType.JOINED, "z", EventType.LOAD)
    assert load.worker is not None and load.worker.info.model == "smol" and load.worker.load.running == 9
    await events.aclose()


async def test_redis_down_raises_backend_unavailable_with_clear_message() -> None:
    with RedisServer() as server:
        store = RegistryStore(server.url, lease_s=1)
        await store.register(INFO)
        server.stop()
        for call in (store.register(INFO), store.list_workers(), store.reap_expired(), store.ping()):
            with pytest.raises(
                BackendUnavailable,
                match=r"registry backend \(redis at redis://127\.0\.0\.1:\d+/0\) unavailable: ",
            ):
                await asyncio.wait_for(call, 30)
        with pytest.raises(BackendUnavailable):
            async with store.subscribe():
                pass
        server.start()  # same port, empty: the store reconnects on its own
        assert await store.list_workers() == []
        await store.aclose()


def test_redact_url_hides_password() -> None:
    assert redact_url("redis://user:secret@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://:secret@h:1/0") == "redis://***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"worker_id": ""}, "worker_id is empty"),
        ({"worker_id": "has space"}, "worker_id"),
        ({"model": " "}, "model is empty"),
        ({"grpc_address": ""}, "grpc_address is empty"),
        ({"grpc_address": "host"}, "grpc_address"),
        ({"grpc_address": "host:70000"}, "grpc_address"),
        ({"transfer_endpoint": ""}, "transfer_endpoint is empty"),
        ({"kv_capacity_blocks": 0}, "kv_capacity_blocks"),
        ({"kv_capacity_blocks": 10**9 + 1}, "kv_capacity_blocks"),
        ({"kv_block_size": -1}, "kv_block_size"),
        ({"version": "v" * 65}, "version"),
    ],
)
def test_validation_names_the_bad_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRegistration, match=message):
        validate_worker_info(replace(INFO, **change))


def test_validation_accepts_colocated_without_transfer_and_unix_sockets() -> None:
    validate_worker_info(replace(INFO, role=WorkerRole.BOTH, transfer_endpoint=""))
    validate_worker_info(replace(INFO, grpc_address="unix:/tmp/w.sock", transfer_endpoint="[::1]:29500"))


def _record(worker_id: str, running: int = 0) -> WorkerRecord:
    return WorkerRecord(info=replace(INFO, worker_id=worker_id), load=WorkerLoad(running=running))


def test_view_state_keeps_unconfirmed_workers_stale_for_one_lease() -> None:
    now = [100.0]
    state = ViewState(clock=lambda: now[0])
    state.apply(WorkerEvent(type=EventType.SNAPSHOT, snapshot=(_record("a"), _record("b")), lease_s=2.0))
    state.apply(WorkerEvent(type=EventType.LOAD, worker_id="a", worker=_record("a", running=3)))
    assert state.snapshot().ids == ("a", "b") and state.snapshot().get("a").load.running == 3
    state.set_connected(False)
    assert state.snapshot().ids == ("a", "b") and not state.snapshot().connected
    state.apply(
        WorkerEvent(type=EventType.SNAPSHOT, snapshot=(_record("b"),), lease_s=2.0)
    )  # after a restart
    assert state.snapshot().ids == ("a", "b") and state.snapshot().stale_ids == {"a"}
    assert state.next_stale_deadline_in() == pytest.approx(2.0)
    now[0] += 2.0
    assert state.drop_stale() and state.snapshot().ids == ("b",)
    state.apply(WorkerEvent(type=EventType.EXPIRED, worker_id="b"))
    assert state.snapshot().ids == () and state.snapshot().version == 6


def test_view_state_rejoin_clears_staleness() -> None:
    state = ViewState(stale_grace_s=5.0)
    state.apply(WorkerEvent(type=EventType.SNAPSHOT, snapshot=(_record("a"),)))
    state.apply(WorkerEvent(type=EventType.SNAPSHOT, snapshot=()))
    assert state.snapshot().stale_ids == {"a"}
    state.apply(WorkerEvent(type=EventType.JOINED, worker_id="a", worker=_record("a", running=1)))
    snapshot = state.snapshot()
    assert snapshot.stale_ids == frozenset() and snapshot.decode_workers()[0].load.running == 1
    assert snapshot.prefill_workers() == ()


def test_redis_server_restarts_empty_on_the_same_port(redis_server: RedisServer) -> None:
    with RedisServer() as server:
        port = server.port
        assert server.ping() and port != redis_server.port
        server.restart()
        assert server.port == port and server.ping()
        server.stop()
        assert not server.ping() and not server.running
    assert not server.running


async def test_block_sets_live_under_the_lease_and_go_with_the_worker(
    store: RegistryStore, redis_server: RedisServer
) -> None:
    key = store.keys.blocks("decode-0")
    many = tuple(range(-1500, 1500))  # more hashes than one Lua unpack takes
    async with aioredis.Redis.from_url(redis_server.url) as redis, store.subscribe() as subscription:
        lease = await store.register(INFO, blocks=many)
        assert await redis.scard(key) == len(many) and 0 < await redis.pttl(key) <= LEASE_S * 1000
        delta = BlockHashDelta(added=(2**62, -(2**63)), removed=tuple(range(-1500, 1490)))
        await store.heartbeat("decode-0", lease.lease_id, WorkerLoad(), delta)
        (blocks,) = await store.block_sets(["decode-0"])
        assert sorted(blocks.hashes) == sorted([*range(1490, 1500), 2**62, -(2**63)])
        await store.heartbeat(
            "decode-0", lease.lease_id, WorkerLoad(), BlockHashDelta(added=(5,), reset=True)
        )
        assert (await store.block_sets(["decode-0"]))[0].hashes == (5,)
        messages = [await asyncio.wait_for(anext(subscription), 30) for _ in range(6)]
        assert [m.type for m in messages] == [
            EventType.JOINED, EventType.BLOCKS, EventType.LOAD, EventType.BLOCKS, EventType.LOAD, EventType.BLOCKS
        ]  # fmt: skip
        assert messages[3].blocks == delta and messages[1].blocks is not None and messages[1].blocks.reset
        await store.deregister("decode-0", lease.lease_id)
        assert not await redis.exists(key)
        lease = await store.register(INFO, blocks=(1, 2))
        await _until_lease_over(store, redis_server, "decode-0")
        assert await store.reap_expired() == ["decode-0"]
        assert not await redis.exists(key)
