"""scalellm.security: the mesh token, secret files, the token interceptor and (mutual) TLS, over
real gRPC servers on loopback with certificates made for the test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from scalellm.security import (
    METADATA_KEY,
    MeshSecurity,
    MeshToken,
    SecretFileError,
    SecurityConfig,
    read_secret,
)
from tests.certs import make_pki

TOKEN = "t0k3n-for-the-tests-0123456789"
SERVICE = "test.Echo"


# ---- the token and secret files ------------------------------------------------------------


def test_the_token_is_compared_as_a_whole_and_never_shown() -> None:
    token = MeshToken(TOKEN)
    assert token.matches(TOKEN) and token.matches(TOKEN.encode())
    assert not token.matches(TOKEN[:-1]) and not token.matches(TOKEN + "x") and not token.matches(None)
    assert TOKEN not in repr(token) and TOKEN not in repr(SecurityConfig(mesh_token=TOKEN))
    assert token.derive("kv-transfer") != token.derive("other") and len(token.derive("x")) == 32
    assert MeshToken.generate().value != MeshToken.generate().value
    for bad in ("short", "has a space in it, long enough", "tab\tinside-and-long-enough"):
        with pytest.raises(ValueError):
            MeshToken(bad)


@pytest.mark.parametrize(("mode", "ok"), [(0o600, True), (0o640, True), (0o400, True), (0o644, False),
                                          (0o660, False), (0o602, False)])  # fmt: skip
def test_a_secret_file_others_can_read_or_change_is_refused(tmp_path: Path, mode: int, ok: bool) -> None:
    path = tmp_path / "secret"
    path.write_text(TOKEN + "\n")
    os.chmod(path, mode)
    if ok:
        assert read_secret(path, "mesh token file") == TOKEN
    else:
        with pytest.raises(SecretFileError, match=f"mode 0{mode:o}.*chmod 600"):
            read_secret(path, "mesh token file")


def test_missing_and_empty_secret_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="No such file"):
        read_secret(tmp_path / "nope", "mesh token file")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    os.chmod(empty, 0o600)
    with pytest.raises(SecretFileError, match="is empty"):
        read_secret(empty, "mesh token file")


def test_security_flags_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        SecurityConfig(mesh_token=TOKEN, mesh_token_file="/x")
    with pytest.raises(ValueError, match="needs all of"):
        SecurityConfig(mesh_tls_cert="c", mesh_tls_key="k")
    with pytest.raises(ValueError, match="at least 16"):
        SecurityConfig(mesh_token="short")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    loaded = SecurityConfig.from_env({"SCALELLM_MESH_TOKEN_FILE": str(token_file)}).load()
    assert loaded.token is not None and loaded.metadata == ((METADATA_KEY, TOKEN),)
    assert SecurityConfig().load() == MeshSecurity() and MeshSecurity().metadata == ()


# ---- a real server ---------------------------------------------------------------------------


class Echo:
    """A service with one method of each shape; counts the calls that reached a handler."""

    def __init__(self) -> None:
        self.calls = 0

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        return request

    async def stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self.calls += 1
        async for request in requests:
            yield request

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Stream": grpc.stream_stream_rpc_method_handler(self.stream),
            },
        )


async def start(security: MeshSecurity, refusals: list[str]) -> tuple[grpc.aio.Server, Echo, int]:
    echo = Echo()
    server = grpc.aio.server(interceptors=security.interceptors(refusals.append))
    server.add_generic_rpc_handlers((echo.handler(),))
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    port = security.add_port(server, "127.0.0.1:0")
    await server.start()
    return server, echo, port


async def unary(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    return await call(b"ping", metadata=metadata, timeout=10)  # type: ignore[no-any-return]


async def stream(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
    call = channel.stream_stream(f"/{SERVICE}/Stream")(iter([b"a", b"b"]), metadata=metadata, timeout=10)
    return [m async for m in call]


async def refused(channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...]) -> str:
    """The status of a call that sends nothing but its metadata (and, unary, one message)."""
    if method == "Unary":
        call = channel.unary_unary(f"/{SERVICE}/Unary")(b"ping", metadata=metadata, timeout=10)
    else:  # no request written: the refusal cannot race a write
        call = channel.stream_stream(f"/{SERVICE}/Stream")(metadata=metadata, timeout=10)
    code, details = await call.code(), await call.details()
    assert TOKEN not in (details or "")
    return code.name  # type: ignore[no-any-return]


async def serving(channel: grpc.aio.Channel) -> bool:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_calls_without_the_token_are_refused_before_any_handler_runs() -> None:
    security, refusals = MeshSecurity(token=MeshToken(TOKEN)), []
    server, echo, port = await start(security, refusals)
    try:
        async with security.channel(f"127.0.0.1:{port}") as channel:
            for bad in ((), ((METADATA_KEY, "x" * 20),), (("authorization", f"Bearer {TOKEN}"),)):
                for method in ("Unary", "Stream"):
                    assert await refused(channel, method, bad) == "UNAUTHENTICATED"
            assert (
                echo.calls == 0 and refusals == ["missing", "missing", "invalid", "invalid"] + ["missing"] * 2
            )
            assert await serving(channel)  # health stays open for probes
            assert await unary(channel, security.metadata) == b"ping"
            assert await stream(channel, security.metadata) == [b"a", b"b"]
            assert echo.calls == 2 and len(refusals) == 6
    finally:
        await server.stop(0)


async def test_mutual_tls_round_trip_and_refusals(tmp_path: Path) -> None:
    pki, strangers = make_pki(tmp_path / "mesh"), make_pki(tmp_path / "other")
    server_files, client_files = pki.issue("server"), pki.issue("client")
    server_side = MeshSecurity(tls=server_files.read())
    server, echo, port = await start(server_side, [])
    address = f"127.0.0.1:{port}"
    try:
        async with MeshSecurity(tls=client_files.read()).channel(address) as channel:
            assert await unary(channel) == b"ping" and await serving(channel)
        plain = grpc.ssl_channel_credentials(root_certificates=Path(pki.ca_file).read_bytes())
        async with grpc.aio.secure_channel(address, plain) as channel:  # TLS, but no client certificate
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(channel)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        async with MeshSecurity(tls=strangers.issue("intruder").read()).channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError):  # signed by another CA, and trusts another
                await unary(channel)
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await unary(channel)
        assert echo.calls == 1
    finally:
        await server.stop(0)


async def test_a_shared_server_name_lets_services_dial_any_host(tmp_path: Path) -> None:
    """Compose and Kubernetes hosts are random names: one certificate name, checked on every dial."""
    pki = make_pki(tmp_path)
    server, _, port = await start(MeshSecurity(tls=pki.issue("server", "scalellm-mesh").read()), [])
    client_tls = pki.issue("client", "scalellm-mesh").read()
    try:
        async with MeshSecurity(tls=client_tls).channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):  # the certificate does not name 127.0.0.1
                await unary(channel)
        named = MeshSecurity(tls=client_tls, server_name="scalellm-mesh")
        async with named.channel(f"127.0.0.1:{port}") as channel:
            assert await unary(channel) == b"ping"
    finally:
        await server.stop(0)


def test_a_tls_key_others_can_read_is_refused(tmp_path: Path) -> None:
    files = make_pki(tmp_path).issue("server")
    os.chmod(files.key, 0o644)
    with pytest.raises(SecretFileError, match="TLS private key"):
        files.read()
    with pytest.raises(SecretFileError, match="TLS private key"):
        files.server_context()
