"""A gateway that routes from the registry, in process over a real kvstore and Redis: it takes
connections only once it has the registry's first snapshot, so a restarted gateway routes its first
request instead of answering 503 no_workers; with no registry at all it still starts."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from scalellm.redis_server import RedisServer, free_port
from scalellm.registry import WorkerInfo, WorkerRole
from scalellm.registry.store import RegistryStore
from services.gateway import server as gateway_server
from services.gateway.admission import ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.server import GatewayServer
from services.kvstore.config import KvstoreConfig
from services.kvstore.server import KvstoreServer


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait for a condition (the timeout is a hang guard only)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


def _health(gateway: GatewayServer) -> dict[str, object]:
    url = f"http://127.0.0.1:{gateway.http_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 while no decode worker is routable
        body = exc.read()
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    return parsed


def _gateway(model_dir: Path, kvstore: str) -> GatewayServer:
    config = GatewayConfig(
        host="127.0.0.1", http_port=0, grpc_port=0, model=str(model_dir), kvstore=(kvstore,), grace_s=0.0
    )
    return GatewayServer(config, model=ServedModel(model_dir, config))


async def test_a_gateway_binds_once_it_knows_the_workers(
    redis_server: RedisServer, demo_model_dir: Path
) -> None:
    kvstore_address = f"127.0.0.1:{free_port()}"
    gateway = _gateway(demo_model_dir, kvstore_address)
    kvstore = KvstoreServer(
        KvstoreConfig(listen=kvstore_address, redis_url=redis_server.url, metrics_port=0, grace_s=0.0)
    )
    starting = asyncio.create_task(gateway.start())
    try:
        # The registry is not there yet: the gateway has tried it and still has not bound.
        await _until(lambda: gateway.view is not None and gateway.view.reconnects >= 1)
        assert not starting.done() and gateway.http_port == 0
        store = RegistryStore(redis_server.url, lease_s=10.0)
        info = WorkerInfo(
            worker_id="decode-0", role=WorkerRole.DECODE, model=demo_model_dir.name,
            grpc_address="127.0.0.1:1", transfer_endpoint="127.0.0.1:2", kv_capacity_blocks=64,
            kv_block_size=16,
        )  # fmt: skip
        await store.register(info)
        await store.aclose()
        await kvstore.start()
        await asyncio.wait_for(starting, 30)
        assert gateway.view is not None and gateway.view.snapshot().ids == ("decode-0",)
        # The first request after binding already sees the worker.
        health = await asyncio.to_thread(_health, gateway)
        assert health["decode_workers"] == 1 and health["status"] == "ok", health
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await gateway.stop(0)
        await kvstore.stop(0)


async def test_without_a_registry_the_gateway_still_starts(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_server, "FIRST_VIEW_WAIT_S", 0.2)
    gateway = _gateway(demo_model_dir, f"127.0.0.1:{free_port()}")
    await asyncio.wait_for(gateway.start(), 30)
    try:
        assert gateway.http_port > 0
        health = await asyncio.to_thread(_health, gateway)
        assert health["decode_workers"] == 0 and health["status"] == "no_workers", health
    finally:
        await gateway.stop(0)
