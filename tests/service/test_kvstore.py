"""The kvstore over gRPC and a real redis-server: membership, leases, the watch, outages."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from scalellm.redis_server import RedisServer, free_port
from scalellm.registry import (
    Backoff,
    EventType,
    RegistryClient,
    RegistryUnavailable,
    ViewSnapshot,
    WorkerEvent,
    WorkerInfo,
    WorkerLoad,
    WorkerRegistration,
    WorkerRole,
    WorkerView,
)
from scalellm.v1 import registry_pb2 as pb
from scalellm.v1 import registry_pb2_grpc as pb_grpc
from services.kvstore.config import KvstoreConfig
from services.kvstore.server import KvstoreServer

ROOT = Path(__file__).resolve().parents[2]


def fast() -> Backoff:
    """Quick retries for tests (a fresh one each time: Backoff counts its attempts)."""
    return Backoff(initial_s=0.05, max_s=0.2)


KvstoreFactory = Callable[..., Awaitable[KvstoreServer]]


def make_info(
    worker_id: str = "decode-0", role: WorkerRole = WorkerRole.DECODE, model: str = "smol"
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=role,
        model=model,
        grpc_address="127.0.0.1:50061",
        transfer_endpoint="127.0.0.1:29500",
        kv_capacity_blocks=1024,
        kv_block_size=16,
        version="0.1.0",
        max_running=32,
    )


async def next_events(
    stream: AsyncIterator[WorkerEvent], count: int, timeout_s: float = 30.0
) -> list[WorkerEvent]:
    """The next count events; timeout_s is a hang guard only."""

    async def take() -> list[WorkerEvent]:
        return [await anext(stream) for _ in range(count)]

    return await asyncio.wait_for(take(), timeout_s)


async def test_register_joins_and_lists(kvstore: KvstoreServer) -> None:
    async with RegistryClient(f"127.0.0.1:{kvstore.port}") as client:
        lease = await client.register(make_info(), WorkerLoad(running=2, free_blocks=900))
        await client.register(make_info("prefill-0", WorkerRole.PREFILL))
        await client.register(make_info("other-0", model="other"))
        assert lease.lease_s == kvstore.config.lease_s and 0 < lease.heartbeat_interval_s < lease.lease_s
        workers = await client.list_workers(model="smol")
        assert [w.worker_id for w in workers] == ["decode-0", "prefill-0"]
        assert workers[0].info == make_info() and workers[0].load.running == 2
        assert workers[0].load.free_blocks == 900 and workers[0].registered_at > time.time() - 60
        decoders = await client.list_workers(role=WorkerRole.DECODE)
        assert [w.worker_id for w in decoders] == ["decode-0", "other-0"]


async def test_silent_worker_expires(kvstore: KvstoreServer) -> None:
    lease_s = kvstore.config.lease_s
    async with RegistryClient(f"127.0.0.1:{kvstore.port}") as client:
        stream = client.watch()
        assert (await next_events(stream, 1))[0].type is EventType.SNAPSHOT
        start = time.monotonic()
        await client.register(make_info())
        joined, expired = await next_events(stream, 2)
        assert (joined.type, expired.type) == (EventType.JOINED, EventType.EXPIRED)
        # Never before its lease ran out (a loaded machine can only make it later).
        assert time.monotonic() - start >= lease_s * 0.9
        assert expired.worker is not None and expired.worker.info == make_info()
        assert await client.list_workers() == []
        await stream.aclose()


async def test_watch_delivers_snapshot_then_changes_in_order(kvstore_factory: KvstoreFactory) -> None:
    kvstore = await kvstore_factory(lease_s=30.0)  # no lease runs out while the test runs
    async with RegistryClient(f"127.0.0.1:{kvstore.port}") as client:
        early = await client.register(make_info("early"), WorkerLoad(running=1))
        stream = client.watch()
        (snapshot,) = await next_events(stream, 1)
        assert snapshot.type is EventType.SNAPSHOT and snapshot.lease_s == 30.0
        assert [(w.info, w.load.running) for w in snapshot.snapshot] == [(make_info("early"), 1)]
        lease = await client.register(make_info("late"))
        sent = WorkerLoad(
            running=3, waiting=1, free_blocks=7, tokens_per_second=12.5, prefill_backlog_tokens=900,
            ttft_s=0.25, itl_s=0.04,
        )  # fmt: skip
        await client.heartbeat(lease, sent)
        assert await client.deregister(lease)
        assert await client.deregister(early)
        events = await next_events(stream, 4)
        assert [(e.type, e.worker_id) for e in events] == [
            (EventType.JOINED, "late"),
            (EventType.LOAD, "late"),
            (EventType.LEFT, "late"),
            (EventType.LEFT, "early"),
        ]
        assert events[0].worker is not None and events[0].worker.info == make_info("late")
        load = events[1].worker.load if events[1].worker else None
        assert load is not None and load.updated_at > 0
        assert load == replace(sent, updated_at=load.updated_at)
        assert early.lease_id != lease.lease_id  # each registration holds its own lease
        await stream.aclose()


async def test_malformed_registrations_are_rejected(kvstore_address: str) -> None:
    good = pb.WorkerInfo(
        worker_id="w",
        role=pb.WORKER_ROLE_DECODE,
        model="smol",
        grpc_address="127.0.0.1:1",
        transfer_endpoint="127.0.0.1:2",
        kv_capacity_blocks=10,
        kv_block_size=16,
    )
    cases = {
        "grpc_address": {"grpc_address": ""},
        "role": {"role": pb.WORKER_ROLE_UNSPECIFIED},
        "role 9": {"role": 9},
        "kv_capacity_blocks 0": {"kv_capacity_blocks": 0},
        "kv_capacity_blocks -5": {"kv_capacity_blocks": -5},
        "kv_capacity_blocks 1000000001": {"kv_capacity_blocks": 10**9 + 1},
        "worker_id": {"worker_id": ""},
        "model": {"model": ""},
        "transfer_endpoint": {"transfer_endpoint": "nowhere"},
        "kv_block_size": {"kv_block_size": 0},
    }
    async with grpc.aio.insecure_channel(kvstore_address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        await stub.Register(pb.RegisterRequest(info=good))
        for expected, change in cases.items():
            info = pb.WorkerInfo()
            info.CopyFrom(good)
            for field, value in change.items():
                setattr(info, field, value)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Register(pb.RegisterRequest(info=info))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
            assert expected.split()[0] in caught.value.details(), caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Heartbeat(pb.HeartbeatRequest(worker_id="w", lease_id="not-mine"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Heartbeat(pb.HeartbeatRequest(worker_id="ghost", lease_id="x"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection(kvstore_address: str) -> None:
    async with grpc.aio.insecure_channel(kvstore_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "scalellm.v1.Registry"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"scalellm.v1.Registry", "grpc.health.v1.Health"} <= names


async def test_redis_restart_worker_reregisters_and_view_recovers(
    redis_server: RedisServer, kvstore_factory: KvstoreFactory
) -> None:
    # Heartbeats every 2 s: the restart is noticed at the next one, and no loaded machine delays
    # one past the lease (which would register the worker a third time).
    kvstore = await kvstore_factory(lease_s=6.0)
    address = f"127.0.0.1:{kvstore.port}"
    view = WorkerView(RegistryClient(address), backoff=fast())
    worker = WorkerRegistration(
        RegistryClient(address), make_info(), lambda: WorkerLoad(running=1), backoff=fast()
    )
    await view.start(wait=True, timeout_s=30)
    await worker.start(timeout_s=30)
    first = await view.wait_until(lambda s: "decode-0" in s.ids, 30)

    await asyncio.to_thread(redis_server.stop)
    await view.wait_until(lambda s: not s.connected, 30)
    assert view.snapshot().ids == ("decode-0",)  # the last view stays while the registry is away
    await asyncio.to_thread(redis_server.start)

    def recovered(snapshot: ViewSnapshot) -> bool:  # the new registration, confirmed by the registry
        record = snapshot.get("decode-0")
        fresh = record is not None and record.registered_at > first.workers[0].registered_at
        return snapshot.connected and not snapshot.stale_ids and fresh

    await view.wait_until(recovered, 30)  # a hang guard only
    # The view can hear of the registration before the worker has read Register's answer.
    await worker.wait_registered(30)
    assert worker.registrations == 2
    await worker.drain()
    await view.wait_until(lambda s: not s.ids, 30)
    await view.stop()
    await view.client.close()
    await worker.client.close()


async def test_redis_down_gives_unavailable_and_view_keeps_last_view(
    redis_server: RedisServer, kvstore_address: str
) -> None:
    async with RegistryClient(kvstore_address) as client, WorkerView(client, backoff=fast()) as view:
        await client.register(make_info())
        await view.wait_until(lambda s: s.ids == ("decode-0",), 30)
        redis_server.stop()
        with pytest.raises(
            RegistryUnavailable, match=r"registry backend \(redis at redis://127\.0\.0\.1:\d+/0\) unavailable"
        ):
            await client.register(make_info("decode-1"))
        async with grpc.aio.insecure_channel(kvstore_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.RegistryStub(channel).ListWorkers(pb.ListWorkersRequest(), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"registry backend (redis at {redis_server.url}) unavailable:" in caught.value.details()
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="scalellm.v1.Registry"))
            async for reply in watch:  # the next reaper pass notices
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
            watch.cancel()
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        snapshot = await view.wait_until(lambda s: not s.connected, 30)
        assert snapshot.ids == ("decode-0",) and snapshot.synced


async def test_client_moves_to_another_replica(kvstore_factory: KvstoreFactory) -> None:
    # Heartbeats every 2 s with a 6 s lease: the move has 4 s of slack, not 0.7 s, on a loaded machine.
    first, second = await kvstore_factory(lease_s=6.0), await kvstore_factory(lease_s=6.0)
    dead = f"127.0.0.1:{free_port()}"
    addresses = [dead, f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]
    worker = WorkerRegistration(RegistryClient(addresses), make_info(), backoff=fast())
    view = WorkerView(RegistryClient(addresses[1:]), backoff=fast())
    await worker.start(timeout_s=30)
    assert worker.client.address == addresses[1]
    await view.start(wait=True, timeout_s=30)
    await view.wait_until(lambda s: "decode-0" in s.ids, 30)

    await first.stop(0)
    stopped = time.time()
    await view.wait_until(lambda s: not s.connected, 30)
    await view.wait_until(lambda s: s.connected, 30)
    assert view.client.address == addresses[2]

    def renewed_after_the_move(snapshot: ViewSnapshot) -> bool:
        """A heartbeat stamped after the first replica went: it went through the second one."""
        record = snapshot.get("decode-0")
        return record is not None and record.load.updated_at > stopped

    await view.wait_until(renewed_after_the_move, 30)  # a hang guard only
    # The same lease, renewed through the other replica: the worker never had to register again.
    assert worker.client.address == addresses[2] and worker.registrations == 1
    assert view.snapshot().ids == ("decode-0",)
    await worker.drain()
    await view.wait_until(lambda s: not s.ids, 30)
    await view.stop()
    await view.client.close()
    await worker.client.close()


async def test_metrics_endpoint(kvstore_factory: KvstoreFactory) -> None:
    kvstore = await kvstore_factory(metrics_port=free_port(), metrics_host="127.0.0.1")
    async with RegistryClient(f"127.0.0.1:{kvstore.port}") as client:
        await client.register(make_info())
    url = f"http://127.0.0.1:{kvstore.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read().decode())
    assert 'scalellm_kvstore_rpcs_total{code="OK",method="Register"} 1.0' in body
    assert "scalellm_kvstore_backend_up 1.0" in body


def test_config_flags_override_environment() -> None:
    env = {
        "SCALELLM_REDIS_URL": "redis://envhost:1/0",
        "SCALELLM_KVSTORE_LEASE_S": "3",
        "SCALELLM_KVSTORE_ADDR": "x:1",
    }
    config = KvstoreConfig.from_args(["--listen", "127.0.0.1:5", "--metrics-port", "0"], environ=env)
    assert config == KvstoreConfig(
        listen="127.0.0.1:5", redis_url="redis://envhost:1/0", lease_s=3.0, metrics_port=0
    )
    with pytest.raises(SystemExit):
        KvstoreConfig.from_args([], environ={"SCALELLM_KVSTORE_LEASE_S": "soon"})
    with pytest.raises(SystemExit):
        KvstoreConfig.from_args(["--lease-s", "0"], environ={})


def test_imports_are_torch_free() -> None:
    code = (
        "import sys, services.kvstore.__main__, scalellm.registry; assert 'torch' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


async def test_main_serves_and_stops_on_sigterm(redis_server: RedisServer) -> None:
    env = os.environ | {"SCALELLM_REDIS_URL": redis_server.url, "SCALELLM_KVSTORE_METRICS_PORT": "0"}
    # -X faulthandler: if it ever hangs on the way out, SIGABRT makes it print every thread's stack.
    cmd = [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "services.kvstore",
        "--listen",
        "127.0.0.1:0",
        "--lease-s",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code: int | None = None
    try:
        assert proc.stdout is not None
        ready = await asyncio.to_thread(proc.stdout.readline)
        assert ready.startswith("READY 127.0.0.1:"), ready
        address = ready.split()[1]
        async with grpc.aio.insecure_channel(address) as channel:
            request = health_pb2.HealthCheckRequest(service="scalellm.v1.Registry")
            replies = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=20)
            async for reply in replies:  # NOT_SERVING until its Redis connection is up
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            replies.cancel()
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
    finally:
        try:
            stderr = proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            stderr = proc.communicate()[1]
    assert code == 0, f"exit code {code} after SIGTERM:\n{stderr}"
    assert "kvstore shutting down" in stderr, stderr


async def test_kvstore_starts_without_redis_and_reports_not_serving() -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = KvstoreServer(KvstoreConfig(listen="127.0.0.1:0", redis_url=nowhere, metrics_port=0, grace_s=0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = health_pb2.HealthCheckRequest(service="scalellm.v1.Registry")
            reply = await health_pb2_grpc.HealthStub(channel).Check(request)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(0)
