"""KvstoreServer: the grpc.aio server with Registry, health, reflection, metrics and the reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scalellm.lifecycle import ReadyLine, cancel_and_wait, stop_requested
from scalellm.registry.errors import BackendUnavailable
from scalellm.registry.reaper import LeaseReaper
from scalellm.registry.store import RegistryStore
from scalellm.v1 import registry_pb2 as pb
from scalellm.v1 import registry_pb2_grpc as pb_grpc
from services.kvstore.config import KvstoreConfig
from services.kvstore.metrics import KvstoreMetrics, MetricsHttpServer
from services.kvstore.servicer import RegistryServicer

log = logging.getLogger(__name__)

REGISTRY_SERVICE = pb.DESCRIPTOR.services_by_name["Registry"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class KvstoreServer:
    """One kvstore replica. Health: "" is SERVING while the process serves; "scalellm.v1.Registry"
    is SERVING only while Redis answers (checked by every reaper pass)."""

    def __init__(self, config: KvstoreConfig) -> None:
        self.config = config
        self.security = config.security.load()
        self.store = RegistryStore(
            config.redis_connection_url(), lease_s=config.lease_s, namespace=config.namespace
        )
        self.metrics = KvstoreMetrics()
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self._reaper = LeaseReaper(
            self.store,
            config.reap_interval_s,
            on_backend_state=self._on_backend_state,
            on_expired=lambda ids: self.metrics.expired.inc(len(ids)),
        )

    async def start(self) -> None:
        """Bind, start serving, and start the reaper and the metrics endpoint (all or nothing)."""
        try:
            await self._start()
        except BaseException:
            await self.stop(0)
            raise
        log.info("kvstore serving on port %d (redis %s)", self.port, self.store.backend.safe_url)

    async def _start(self) -> None:
        if self.config.metrics_port:
            self._metrics_http = MetricsHttpServer(
                self.metrics, self.config.metrics_bind_host, self.config.metrics_port
            )
            self.metrics_port = self._metrics_http.port
        server = self.security.server(self.metrics.count_auth_failure)
        self._server = server
        pb_grpc.add_RegistryServicer_to_server(RegistryServicer(self.store, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (REGISTRY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = self.security.add_port(server, self.config.listen)
        await server.start()
        await self._reaper.tick()  # sets the Registry health status before the first client asks
        self._tasks = [
            asyncio.create_task(self._reaper.run(), name="kvstore-reaper"),
            asyncio.create_task(self._count_workers(), name="kvstore-worker-gauge"),
        ]

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, let calls finish for grace_s, then close everything (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        if self._server is not None:
            await self._server.stop(self.config.grace_s if grace_s is None else grace_s)
            self._server = None
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        await self.store.aclose()

    async def _on_backend_state(self, up: bool) -> None:
        self.metrics.backend_up.set(1 if up else 0)
        await self.health.set(REGISTRY_SERVICE, _SERVING if up else _NOT_SERVING)

    async def _count_workers(self, period_s: float = 1.0) -> None:
        while True:
            with contextlib.suppress(BackendUnavailable):
                self.metrics.workers.set(await self.store.count())
            await asyncio.sleep(period_s)


async def serve(config: KvstoreConfig) -> None:
    """Run one replica until SIGTERM or SIGINT, then shut down gracefully."""
    server = KvstoreServer(config)
    await server.start()
    host = config.listen.rpartition(":")[0]
    stopping = stop_requested()  # before READY: a stop right after it drains
    print(ReadyLine(f"{host}:{server.port}"), flush=True)  # like every other service of the mesh
    try:
        await stopping.wait()
        log.info("kvstore shutting down (grace %.1f s)", config.grace_s)
    finally:
        await server.stop()
