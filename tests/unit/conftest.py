"""Fixtures of the unit tests: the gateway in-process in front of scripted decode workers
(ScriptedDecode and Mesh, tests/unit/test_gateway_server.py), and the sampler on each of its
draw paths, for every module here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from scalellm.engine.sampler import Sampler
from scalellm.v1 import worker_pb2_grpc
from services.gateway.admission import ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.server import GatewayServer
from tests.unit.test_gateway_server import REPLY, Mesh, MeshFactory, ScriptedDecode


@pytest.fixture(scope="module")
def served_config(demo_model_dir: Path) -> GatewayConfig:
    return GatewayConfig(host="127.0.0.1", http_port=0, grpc_port=0, model=str(demo_model_dir), grace_s=0.5)


@pytest.fixture(scope="module")
def served_model(demo_model_dir: Path, served_config: GatewayConfig) -> ServedModel:
    return ServedModel(demo_model_dir, served_config)


@pytest.fixture
async def mesh_factory(served_config: GatewayConfig, served_model: ServedModel) -> AsyncIterator[MeshFactory]:
    started: list[tuple[Mesh, list[grpc.aio.Server]]] = []

    async def make(
        workers: int = 1,
        worker_kw: list[dict[str, Any]] | None = None,
        model_dir: Path | None = None,
        **overrides: Any,
    ) -> Mesh:
        """model_dir: serve this folder instead of the demo model (its own tokenizer, template)."""
        reply_ids = served_model.tokenizer.encode(REPLY)
        scripted, servers, addrs = [], [], []
        for i in range(workers):
            worker = ScriptedDecode(reply_ids, **((worker_kw or [{}] * workers)[i]))
            server = grpc.aio.server()
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(worker, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            scripted.append(worker)
            servers.append(server)
            addrs.append(f"w{i}=127.0.0.1:{port}")
        settings = {"decode_addrs": tuple(addrs)} | overrides
        config = GatewayConfig(**{**_fields(served_config), **settings})
        gateway = GatewayServer(config, model=ServedModel(model_dir or served_model.path, config))
        await gateway.start()
        mesh = Mesh(gateway, scripted, reply_ids, servers)
        started.append((mesh, servers))
        return mesh

    yield make
    for mesh, servers in started:
        for client in mesh.clients:
            await client.close()
        await mesh.gateway.stop(0)
        for server in servers:
            await server.stop(0)


def _fields(config: GatewayConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


@pytest.fixture
async def mesh(mesh_factory: MeshFactory) -> Mesh:
    return await mesh_factory()


@pytest.fixture(params=["torch", "kernel"])
def make_sampler(request: pytest.FixtureRequest) -> Callable[[], Sampler]:
    """A CPU Sampler maker: torch's ops, or the C++ kernels (cpu_kernels.sampler_kernels, as the
    model runner builds it; skipped without a C++ toolchain)."""
    from scalellm.engine import cpu_kernels

    if request.param == "torch":
        return lambda: Sampler(torch.device("cpu"))
    if not cpu_kernels.available():
        pytest.skip("no C++ toolchain for the CPU kernels")
    return lambda: Sampler(torch.device("cpu"), cpu_kernels.sampler_kernels(torch.device("cpu")))
