"""PlannerServer: the registry view, the planner loop, gRPC health and /metrics on one event loop.

Health: "" is SERVING while the process runs (liveness and readiness alike: a planner cut off from
the registry keeps exporting its last counts, which is what an autoscaler should keep acting on).
Security as in every internal service: its registry calls carry the mesh token (mesh TLS when
configured), its gRPC server checks the token first (health stays open, reflection does not), and
/metrics binds the --listen host unless --metrics-host says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from scalellm.lifecycle import ReadyLine, cancel_and_wait, stop_requested
from scalellm.planner import Planner, PlannerLoop, TierPlan
from scalellm.registry import RegistryClient, WorkerView
from services.planner.config import PlannerServiceConfig
from services.planner.metrics import PlannerMetrics

log = logging.getLogger(__name__)


class PlannerServer:
    def __init__(self, config: PlannerServiceConfig) -> None:
        self.config = config
        self.security = config.security.load()
        self.metrics = PlannerMetrics()
        self.client = RegistryClient(list(config.kvstore), security=self.security)
        self.view = WorkerView(self.client, model=config.model)
        self.planner = Planner(config, config.limits(), model=config.model)
        self.loop = PlannerLoop(self.planner, self.view, self._on_plan)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_http: WSGIServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind /metrics and gRPC, then watch the registry and plan (all or nothing)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        c = self.config
        if c.metrics_port:
            self._metrics_http, _ = start_http_server(
                c.metrics_port, addr=c.metrics_bind_host, registry=self.metrics.registry
            )
            self.metrics_port = int(self._metrics_http.server_port)
        server = self.security.server(self.metrics.count_auth_failure)
        self._server = server
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = self.security.add_port(server, c.listen)
        await server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.view.start()
        self._task = asyncio.create_task(self.loop.run(), name="planner-loop")
        log.info("planner serving health on %d, metrics on %d", self.port, self.metrics_port)

    def _on_plan(self, plans: Sequence[TierPlan]) -> None:
        self.metrics.update(plans, self.view.connected)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self.view.stop()
        await self.client.close()
        if self._server is not None:
            await self._server.stop(0.5)
            self._server = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None


async def serve(config: PlannerServiceConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    server = PlannerServer(config)
    await server.start()
    host = config.listen.rpartition(":")[0]
    stopping = stop_requested()  # before READY: a stop right after it drains
    print(ReadyLine(f"{host}:{server.port}"), flush=True)  # like every other service of the mesh
    try:
        await stopping.wait()
    finally:
        await server.stop()
