"""The gRPC process around a worker: health, reflection, the error interceptor, metrics,
registration with the kvstore, and drain on SIGTERM.

    start: engine thread up -> gRPC bound -> health SERVING -> registered (lease + heartbeats,
           which carry the engine's prefix-cache block hashes for prefix-aware routing)
    SIGTERM: health NOT_SERVING, deregister, refuse new work, finish in-flight (drain timeout),
             abort the rest, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scalellm.lifecycle import ReadyLine, run_event_loop, stop_requested
from scalellm.registry import RegistryClient, WorkerRegistration
from scalellm.worker.config import WorkerConfig
from scalellm.worker.engine_host import EngineHost
from scalellm.worker.errors import ErrorInterceptor
from scalellm.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class Worker(Protocol):
    draining: bool
    in_flight: int
    host: EngineHost

    @property
    def transfer_endpoint(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


AddServicer = Callable[[grpc.aio.Server], str]
"""Registers the worker's servicer on the server; returns its full service name."""


class WorkerServer:
    def __init__(
        self, config: WorkerConfig, worker: Worker, metrics: WorkerMetrics, add_servicer: AddServicer
    ) -> None:
        self.config = config
        self.worker = worker
        self.metrics = metrics
        self._add_servicer = add_servicer
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.registration: WorkerRegistration | None = None
        self.port = 0
        self.metrics_port = 0
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        return self.config.advertised(self.port)

    async def start(self) -> None:
        await self.worker.start()
        security = self.config.security.load()
        server = security.server(self.metrics.count_auth_failure, [ErrorInterceptor()])
        name = self._add_servicer(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = security.add_port(server, self.config.listen)
        await server.start()
        self.server = server
        for service in ("", name):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.metrics_bind_host)
        if self.config.kvstore:
            info = self.worker.host.info(self.address, self.worker.transfer_endpoint)
            self.registration = WorkerRegistration(
                RegistryClient(list(self.config.kvstore), security=security),
                info,
                self.worker.host.load,
                block_source=self.worker.host.aengine.take_block_hash_delta,
            )
            await self.registration.start(wait=False)
        log.info(
            "%s %s serving on %s%s%s", self.config.role.name.lower(), self.config.worker_id, self.address,
            f", KV transfer on {self.worker.transfer_endpoint}" if self.worker.transfer_endpoint else "",
            f", metrics on :{self.metrics_port}" if self.metrics_port else "",
        )  # fmt: skip

    async def drain_and_stop(self) -> None:
        """Stop taking work, let in-flight requests finish (up to the drain timeout), stop."""
        if self._stopped.is_set():
            return
        self.worker.draining = True
        await self.health.enter_graceful_shutdown()
        if self.registration is not None:
            with contextlib.suppress(Exception):
                await self.registration.drain()
        deadline = asyncio.get_running_loop().time() + self.config.drain_timeout_s
        while self.worker.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self.worker.stop()
        self.metrics.close()
        self._stopped.set()

    async def run_until(self, stopping: asyncio.Event) -> None:
        await stopping.wait()
        log.info("draining (up to %.0f s)", self.config.drain_timeout_s)
        await self.drain_and_stop()


def run_worker(config: WorkerConfig, build: Callable[[WorkerConfig], WorkerServer]) -> int:
    """Process entry point shared by the prefill and decode services."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        server = build(config)
        await server.start()
        stopping = stop_requested()
        print(ReadyLine(server.address), flush=True)
        await server.run_until(stopping)

    run_event_loop(main())
    return 0
