"""GatewayServer: the gRPC server (Gateway, health, reflection) and the HTTP app on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scalellm.lifecycle import ReadyLine, cancel_and_wait, wait_for_stop_signal
from scalellm.models.prepare import resolve_model_dir
from scalellm.registry import RegistryClient, WorkerView
from scalellm.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.auth import ApiKeys
from services.gateway.config import GatewayConfig
from services.gateway.core import GatewayCore
from services.gateway.http_app import HttpApi
from services.gateway.model import ServedModel
from services.gateway.servicer import GatewayServicer
from services.gateway.workers import RegistryWorkers, StaticWorkers, WorkerSource

log = logging.getLogger(__name__)

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FIRST_VIEW_WAIT_S = 5.0
"""How long start() waits for the registry's first snapshot before binding anyway: a restarted
gateway that takes connections only once it knows the workers routes its first request."""


class GatewayServer:
    """One gateway replica. Health ("" and scalellm.v1.Gateway) is SERVING while a decode worker is
    routable; /health says the same over HTTP. `source` and `model` may be injected by tests."""

    def __init__(
        self, config: GatewayConfig, *, source: WorkerSource | None = None, model: ServedModel | None = None
    ) -> None:
        self.config = config
        self._source = source
        self._model = model
        self.core: GatewayCore | None = None
        self.view: WorkerView | None = None
        self.health = health.aio.HealthServicer()
        self.http_port = 0
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopped = False

    def _make_source(self, model: ServedModel) -> WorkerSource:
        c = self.config
        if c.decode_addrs:
            return StaticWorkers(c.decode_addrs, c.prefill_addrs)
        if c.kvstore:
            client = RegistryClient(c.kvstore, security=c.security.load())
            self.view = WorkerView(client, model=model.worker_model)
            return RegistryWorkers(self.view)
        raise ValueError("no workers to route to: give --kvstore or --decode-addr")

    async def start(self) -> None:
        """Load the tokenizer, start watching the registry, bind both listeners."""
        c = self.config
        model = self._model
        if model is None:
            model = await asyncio.to_thread(ServedModel, resolve_model_dir(c.model), c)
        tls = c.tls.read() if c.tls else None  # a bad certificate or key stops the start here
        source = self._source or self._make_source(model)
        keys = ApiKeys.load(c.api_keys_file) if c.api_keys_file else ApiKeys.disabled()
        self.core = core = GatewayCore(c, model, source, keys)
        if self.view is not None:
            with contextlib.suppress(asyncio.TimeoutError):  # no registry yet: serve; the view keeps trying
                await self.view.start(wait=True, timeout_s=FIRST_VIEW_WAIT_S)

        options = [("grpc.max_receive_message_length", c.max_payload_bytes)]
        self._grpc = server = grpc.aio.server(options=options)
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (GATEWAY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{c.host}:{c.grpc_port}"
        self.grpc_port = (
            server.add_secure_port(address, tls.server_credentials())
            if tls
            else server.add_insecure_port(address)
        )
        await server.start()

        self._runner = web.AppRunner(HttpApi(core).build_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        ssl_context = c.tls.server_context() if c.tls else None
        site = web.TCPSite(self._runner, c.host, c.http_port, backlog=1024, ssl_context=ssl_context)
        await site.start()
        self.http_port = self._runner.addresses[0][1]
        await self._update_health()
        self._watch = asyncio.create_task(self._watch_workers(), name="gateway-worker-watch")
        log.info(
            "gateway serving %s: %s %d, grpc%s %d", model.name, "https" if tls else "http", self.http_port,
            " (TLS)" if tls else "", self.grpc_port,
        )  # fmt: skip

    async def _update_health(self) -> None:
        assert self.core is not None
        status = _SERVING if self.core.router.can_serve() and not self.core.draining else _NOT_SERVING
        for service in ("", GATEWAY_SERVICE):
            await self.health.set(service, status)

    async def _watch_workers(self, period_s: float = 0.5) -> None:
        """Keep health in step with the worker set and close channels to workers that left."""
        assert self.core is not None
        last = None
        while True:
            current = self.core.source.current()
            if current is not last:
                last = current
                await self._update_health()
                self.core.prune_channels()
            await asyncio.sleep(period_s)

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new requests, let those in flight finish for grace_s, then close (idempotent)."""
        if self._stopped or self.core is None:
            return
        self._stopped = True
        core = self.core
        core.draining = True
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while core.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._watch is not None:
            await cancel_and_wait(self._watch)
        if self._grpc is not None:
            await self._grpc.stop(0.5)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.view is not None:
            await self.view.stop()
            await self.view.client.close()
        await core.close()


async def serve(config: GatewayConfig) -> None:
    """Run one gateway until SIGTERM or SIGINT, then drain gracefully."""
    server = GatewayServer(config)
    await server.start()
    print(
        ReadyLine(f"{config.host}:{server.http_port}", {"grpc": f"{config.host}:{server.grpc_port}"}),
        flush=True,
    )
    try:
        await wait_for_stop_signal()
        log.info("gateway shutting down (grace %.1f s)", config.grace_s)
    finally:
        await server.stop()
