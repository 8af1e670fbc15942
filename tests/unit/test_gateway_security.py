"""The gateway's own doors: HTTPS and gRPC over TLS, the mesh token (and mutual TLS) on its calls
to workers, API-key refusals counted by reason and never shown. In-process gateway, scripted
decode workers behind a real gRPC server that checks the token (tests/unit/test_gateway_server.py)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx2 as httpx  # what the openai client is built on
import openai
import pytest

from scalellm.security import MeshSecurity, MeshToken, SecretFileError, SecurityConfig, TlsFiles
from scalellm.v1 import gateway_pb2, gateway_pb2_grpc, worker_pb2_grpc
from services.gateway.admission import ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.server import GatewayServer
from tests.certs import Pki, make_pki
from tests.unit.test_gateway_server import (
    REPLY,
    ScriptedDecode,
)

TOKEN = "mesh-token-of-the-gateway-tests"
MODEL = "SmolLM2-135M-Instruct"
OPEN = MeshSecurity()
Start = Callable[..., Awaitable[tuple[GatewayServer, ScriptedDecode]]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def start(served_config: GatewayConfig, served_model: ServedModel) -> AsyncIterator[Start]:
    """A scripted decode worker serving with ``worker`` security, and a gateway in front of it."""
    running: list[tuple[GatewayServer, grpc.aio.Server]] = []

    async def make(worker: MeshSecurity = OPEN, **overrides: Any) -> tuple[GatewayServer, ScriptedDecode]:
        scripted = ScriptedDecode(served_model.tokenizer.encode(REPLY))
        server = grpc.aio.server(interceptors=worker.interceptors())
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(scripted, server)
        port = worker.add_port(server, "127.0.0.1:0")
        await server.start()
        fields = {name: getattr(served_config, name) for name in served_config.__dataclass_fields__}
        config = GatewayConfig(
            **(fields | {"decode_addrs": (f"w0=127.0.0.1:{port}",), "route_attempts": 1} | overrides)
        )
        gateway = GatewayServer(config, model=ServedModel(served_model.path, config))
        running.append((gateway, server))
        await gateway.start()
        return gateway, scripted

    yield make
    for gateway, server in running:
        await gateway.stop(0)
        await server.stop(0)


def client(url: str, key: str = "none", http_client: httpx.AsyncClient | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, http_client=http_client)


async def complete(openai_client: openai.AsyncOpenAI) -> str:
    async with openai_client:
        reply = await openai_client.completions.create(model=MODEL, prompt="x", temperature=0)
    return reply.choices[0].text


async def test_the_gateway_serves_https_and_grpc_over_tls(start: Start, pki: Pki) -> None:
    files = pki.issue("gateway")
    gateway, _ = await start(tls_cert=files.cert, tls_key=files.key)
    trust = ssl.create_default_context(cafile=pki.ca_file)
    https = f"https://127.0.0.1:{gateway.http_port}"
    assert await complete(client(https, http_client=httpx.AsyncClient(verify=trust))) == REPLY
    with pytest.raises(openai.APIConnectionError):  # the server's certificate is not trusted
        await complete(client(https))
    async with aiohttp.ClientSession() as session:  # plain HTTP to the TLS port gets nothing
        with pytest.raises(aiohttp.ClientError):
            await session.get(f"http://127.0.0.1:{gateway.http_port}/health")

    credentials = grpc.ssl_channel_credentials(root_certificates=Path(pki.ca_file).read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{gateway.grpc_port}", credentials) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        messages = [m async for m in stub.Generate(gateway_pb2.GatewayGenerateRequest(text="x"))]
        assert "".join(m.text for m in messages) == REPLY
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway_pb2_grpc.GatewayStub(channel).ListModels(
                gateway_pb2.ListModelsRequest(), timeout=10
            )


async def test_calls_to_workers_carry_the_mesh_token_over_mutual_tls(start: Start, pki: Pki) -> None:
    worker_files, gateway_files = pki.issue("worker"), pki.issue("gateway")
    worker = MeshSecurity(token=MeshToken(TOKEN), tls=worker_files.read())
    mesh = SecurityConfig(
        mesh_token=TOKEN,
        mesh_tls_cert=gateway_files.cert,
        mesh_tls_key=gateway_files.key,
        mesh_tls_ca=pki.ca_file,
    )
    gateway, scripted = await start(worker, security=mesh)
    assert await complete(client(f"http://127.0.0.1:{gateway.http_port}")) == REPLY
    assert len(scripted.requests) == 1


async def test_a_gateway_without_the_token_cannot_call_a_worker(start: Start) -> None:
    gateway, scripted = await start(MeshSecurity(token=MeshToken(TOKEN)))
    with pytest.raises(openai.APIStatusError) as err:
        await complete(client(f"http://127.0.0.1:{gateway.http_port}"))
    # a mesh misconfigured this way is the server's fault: 500, naming the refusal, nothing ran
    assert err.value.status_code == 500 and "UNAUTHENTICATED" in err.value.message
    assert scripted.requests == []


async def test_auth_failures_are_counted_by_reason_and_never_shown(
    start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-right team\n")
    keys.chmod(0o600)
    gateway, _ = await start(api_keys_file=str(keys))
    url = f"http://127.0.0.1:{gateway.http_port}"
    caplog.set_level(logging.DEBUG)
    for key in ("sk-wrong-and-secret", "sk-wrong-and-secret"):
        with pytest.raises(openai.AuthenticationError):
            await complete(client(url, key))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models", headers={"Authorization": "Token x"}) as r:
            assert r.status == 401
        async with session.get(f"{url}/v1/models") as r:
            assert r.status == 401
        async with session.get(f"{url}/metrics", headers={"Authorization": "Bearer sk-right"}) as r:
            metrics = await r.text()
    assert 'scalellm_gateway_auth_failures_total{reason="unknown"} 2.0' in metrics
    assert 'scalellm_gateway_auth_failures_total{reason="malformed"} 1.0' in metrics
    assert 'scalellm_gateway_auth_failures_total{reason="missing"} 1.0' in metrics
    assert "sk-wrong" not in metrics and "sk-wrong" not in caplog.text


async def test_a_keys_file_others_can_read_is_refused(start: Start, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-right team\n")
    keys.chmod(0o644)
    with pytest.raises(SecretFileError, match="other users may read"):
        await start(api_keys_file=str(keys))


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        GatewayConfig.from_args(["--tls-cert", "c.pem"], {})
    config = GatewayConfig.from_args([], {"SCALELLM_GATEWAY_TLS_CERT": "c", "SCALELLM_GATEWAY_TLS_KEY": "k"})
    assert config.tls == TlsFiles("c", "k")
