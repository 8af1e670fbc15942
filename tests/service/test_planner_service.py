"""`python -m services.planner` against a real kvstore and Redis: it exports the desired counts and
the signals behind them on /metrics, answers the gRPC health protocol, and stays torch-free. Like
every internal service, it reads the registry with the mesh token (and mesh TLS), checks the token
on its own gRPC server, and binds /metrics to the host of --listen."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from functools import partial
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from scalellm.launcher.probes import grpc_serving
from scalellm.lifecycle import ReadyLine
from scalellm.redis_server import free_port
from scalellm.registry import RegistryClient, WorkerInfo, WorkerLoad, WorkerRegistration, WorkerRole
from scalellm.security import SecurityConfig
from services.kvstore.server import KvstoreServer
from services.planner.config import PlannerServiceConfig
from services.planner.server import PlannerServer
from tests.certs import make_pki
from tests.service.conftest import KvstoreFactory
from tests.sockets import listening

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "the-planner-test-mesh-token-0123"


def _info(worker_id: str, role: WorkerRole) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id, role=role, model="smol", grpc_address="127.0.0.1:1",
        transfer_endpoint="127.0.0.1:2" if role is WorkerRole.DECODE else "", kv_capacity_blocks=100,
        kv_block_size=16, max_running=4,
    )  # fmt: skip


def _gauges(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(gauges: dict, name: str, **labels: str) -> float | None:  # type: ignore[type-arg]
    return gauges.get((name, tuple(sorted(labels.items()))))


async def _until(predicate, what: str, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition (a hang guard only bounds it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await asyncio.to_thread(predicate):
        assert loop.time() < deadline, f"no {what} within {timeout_s} s"
        await asyncio.sleep(0.1)


async def test_the_planner_exports_desired_counts_that_follow_the_load(kvstore: KvstoreServer) -> None:
    metrics_port = free_port()
    env = os.environ | {
        "SCALELLM_PLANNER_KVSTORE": f"127.0.0.1:{kvstore.port}",  # the environment fallback
        "SCALELLM_PLANNER_METRICS_PORT": str(metrics_port),
    }
    cmd = [
        sys.executable, "-m", "services.planner", "--listen", "127.0.0.1:0", "--metrics-host", "127.0.0.1",
        "--max-decode", "3", "--interval-s", "0.1", "--up-window-s", "0.3", "--up-cooldown-s", "0",
        "--down-window-s", "0.3", "--down-cooldown-s", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        assert proc.stdout is not None
        lines = []
        while not (ready := await asyncio.to_thread(proc.stdout.readline)).startswith("READY") and ready:
            lines.append(ready)
        parsed = ReadyLine.parse(ready.rstrip("\n"))  # read as the launcher reads it
        assert parsed is not None and parsed.address.startswith("127.0.0.1:"), lines
        assert parsed.port_of() > 0 and await asyncio.to_thread(grpc_serving, parsed.address)
        loads = {WorkerRole.DECODE: WorkerLoad(free_blocks=100), WorkerRole.PREFILL: WorkerLoad()}
        async with RegistryClient(f"127.0.0.1:{kvstore.port}") as client:
            workers = [  # real registrations, heartbeating whatever `loads` says now
                WorkerRegistration(client, _info(f"{role.name.lower()}-1", role), partial(loads.__getitem__, role),
                                   heartbeat_interval_s=0.1)
                for role in loads
            ]  # fmt: skip
            for worker in workers:
                await worker.start()

            def desired(tier: str, count: int) -> bool:
                return (
                    _value(_gauges(url), "scalellm_planner_desired_replicas", model="smol", tier=tier)
                    == count
                )

            try:
                await _until(lambda: desired("decode", 1) and desired("prefill", 1), "first plan")
                # 4 running + 8 waiting on a batch of 4, 1 KV block in 4 used, 900 prompt tokens queued:
                loads[WorkerRole.DECODE] = WorkerLoad(running=4, waiting=8, free_blocks=75, itl_s=0.02)
                loads[WorkerRole.PREFILL] = WorkerLoad(prefill_backlog_tokens=900, ttft_s=0.5)
                await _until(lambda: desired("decode", 3), "decode scaled to its maximum")
                gauges = _gauges(url)
                assert _value(gauges, "scalellm_planner_needed_replicas", model="smol", tier="decode") == 4.0
                labels = {"model": "smol", "tier": "decode"}
                assert (
                    _value(gauges, "scalellm_planner_signal_ratio", **labels, signal="occupancy") == 3 / 0.75
                )
                assert _value(gauges, "scalellm_planner_waiting", **labels) == 8
                assert _value(gauges, "scalellm_planner_kv_usage", **labels) == 0.25
                assert _value(gauges, "scalellm_planner_itl_seconds", **labels) == 0.02
                assert _value(gauges, "scalellm_planner_live_replicas", **labels) == 1
                labels["tier"] = "prefill"
                assert _value(gauges, "scalellm_planner_prefill_backlog_tokens", **labels) == 900
                assert _value(gauges, "scalellm_planner_ttft_seconds", **labels) == 0.5
                assert desired("prefill", 1)  # 900 tokens: far under the backlog target
                assert _value(gauges, "scalellm_planner_registry_connected") == 1

                loads[WorkerRole.DECODE] = WorkerLoad(free_blocks=100)
                loads[WorkerRole.PREFILL] = WorkerLoad()
                await _until(lambda: desired("decode", 1), "decode back at its minimum")
                events = {d: _value(_gauges(url), "scalellm_planner_scale_events_total", model="smol",
                                    tier="decode", direction=d) for d in ("up", "down")}  # fmt: skip
                assert events == {"up": 1, "down": 2}  # 1 -> 3, then one at a time
            finally:
                for worker in workers:
                    await worker.drain()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0


def test_config_reads_flags_then_environment_and_refuses_bad_limits() -> None:
    config = PlannerServiceConfig.from_args(
        ["--kvstore", "a:1", "--max-decode", "6", "--listen", "10.1.2.3:50080"],
        {
            "SCALELLM_PLANNER_KVSTORE": "ignored:1",
            "SCALELLM_PLANNER_MIN_DECODE": "2",
            "SCALELLM_PLANNER_UP_WINDOW_S": "9",
            "SCALELLM_MESH_TOKEN_FILE": "/run/secrets/mesh-token",  # what every service reads
            "SCALELLM_MESH_TLS_SERVER_NAME": "",  # empty: unset, as for the others
        },
    )
    assert (config.kvstore, config.min_decode, config.max_decode, config.up_window_s) == (("a:1",), 2, 6, 9.0)
    assert config.security == SecurityConfig(mesh_token_file="/run/secrets/mesh-token")
    assert config.metrics_bind_host == "10.1.2.3"  # /metrics follows --listen unless told otherwise
    told = PlannerServiceConfig.from_args(["--kvstore", "a:1", "--metrics-host", "127.0.0.1"], {})
    assert (told.listen, told.metrics_bind_host) == ("0.0.0.0:50080", "127.0.0.1")
    with pytest.raises(SystemExit):
        PlannerServiceConfig.from_args(["--kvstore", "a:1", "--mesh-tls-cert", "c.pem"], {})  # not alone
    with pytest.raises(SystemExit):
        PlannerServiceConfig.from_args(["--kvstore", "a:1", "--min-prefill", "3", "--max-prefill", "2"], {})
    with pytest.raises(SystemExit):
        PlannerServiceConfig.from_args([], {})  # no kvstore


def test_the_planner_service_is_torch_free() -> None:
    code = (
        "import sys, services.planner.__main__, scalellm.planner; assert 'torch' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


async def _list_services(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = [r async for r in stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)]
    return {s.name for s in replies[0].list_services_response.service}


async def _refused_reflection(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The status of a reflection stream that writes nothing, so a refusal cannot race a write."""
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=10)
    return await call.code()  # type: ignore[no-any-return]


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(reply.status)


def _planner(kvstore: KvstoreServer, security: SecurityConfig, metrics_port: int = 0) -> PlannerServer:
    return PlannerServer(
        PlannerServiceConfig(
            kvstore=(f"127.0.0.1:{kvstore.port}",), listen="127.0.0.1:0", metrics_port=metrics_port,
            interval_s=0.05, security=security,
        )
    )  # fmt: skip


def _auth_failures(registry: object, reason: str) -> float:
    return registry.get_sample_value("scalellm_mesh_auth_failures_total", {"reason": reason}) or 0.0  # type: ignore[attr-defined]


async def test_with_the_mesh_token_the_planner_reads_the_registry_and_guards_its_server(
    kvstore_factory: KvstoreFactory,
) -> None:
    kvstore = await kvstore_factory(security=SecurityConfig(mesh_token=TOKEN))
    mesh = SecurityConfig(mesh_token=TOKEN).load()
    metrics_port = free_port()
    planner = _planner(kvstore, SecurityConfig(mesh_token=TOKEN), metrics_port)
    await planner.start()
    try:
        async with RegistryClient(f"127.0.0.1:{kvstore.port}", security=mesh) as client:
            worker = WorkerRegistration(client, _info("decode-1", WorkerRole.DECODE), WorkerLoad)
            await worker.start()
            try:  # the planner's registry calls carry the token: its view sees the worker
                await planner.view.wait_until(lambda s: s.get("decode-1") is not None, 30)
            finally:
                await worker.drain()
        assert _auth_failures(kvstore.metrics.registry, "missing") == 0

        address = f"127.0.0.1:{planner.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING  # open for probes
            assert await _refused_reflection(channel) is grpc.StatusCode.UNAUTHENTICATED  # reflection is not
            assert "grpc.health.v1.Health" in await _list_services(channel, mesh.metadata)
        assert _auth_failures(planner.metrics.registry, "missing") == 1
        # /metrics binds the --listen host (loopback here), not every interface
        assert ("127.0.0.1", metrics_port) in listening() and ("0.0.0.0", metrics_port) not in listening()
    finally:
        await planner.stop()

    unarmed = _planner(kvstore, SecurityConfig())  # no token: the kvstore refuses its registry calls
    await unarmed.start()
    try:
        await _until(lambda: _auth_failures(kvstore.metrics.registry, "missing") > 0, "a refused watch")
        assert not unarmed.view.connected and not unarmed.view.snapshot().synced
    finally:
        await unarmed.stop()


async def test_the_planner_reads_the_registry_and_serves_over_mutual_tls(
    kvstore_factory: KvstoreFactory, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)

    def mesh(name: str) -> SecurityConfig:
        files = pki.issue(name)
        return SecurityConfig(
            mesh_token=TOKEN, mesh_tls_cert=files.cert, mesh_tls_key=files.key, mesh_tls_ca=pki.ca_file
        )

    kvstore = await kvstore_factory(security=mesh("kvstore"))
    planner = _planner(kvstore, mesh("planner"))
    await planner.start()
    try:
        await planner.view.wait_until(lambda s: s.synced, 30)  # the watch is up over mutual TLS
        address = f"127.0.0.1:{planner.port}"
        async with mesh("probe").load().channel(address) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(address) as channel:  # plaintext: no TLS handshake
            with pytest.raises(grpc.aio.AioRpcError):
                await _health(channel)
    finally:
        await planner.stop()
