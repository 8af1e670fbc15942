"""GatewayCore: what the HTTP and gRPC front ends share: keys, admission, preprocessing, routing.

A front end authenticates, opens a RequestScope (the in-flight bound and the request's metrics),
parses its wire format into a GenerationSpec, and calls generate(); the rest is common.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from services.gateway.auth import ApiKeys, KeyRefused
from services.gateway.channels import WorkerChannels
from services.gateway.config import GatewayConfig
from services.gateway.dispatch import Dispatcher
from services.gateway.errors import ErrorKind, GatewayError
from services.gateway.generation import Generation, start_generation
from services.gateway.metrics import GatewayMetrics
from services.gateway.model import ServedModel
from services.gateway.preprocess import Preprocessor
from services.gateway.request import GenerationSpec
from services.gateway.routing import Router
from services.gateway.workers import WorkerSource


class RequestScope:
    """One admitted request: counts against the in-flight bound and times it (front ends count outcomes)."""

    __slots__ = ("_core", "api", "received_at")

    def __init__(self, core: GatewayCore, api: str) -> None:
        self._core = core
        self.api = api
        self.received_at = time.perf_counter()

    def __enter__(self) -> RequestScope:
        core = self._core
        if core.draining:
            raise GatewayError(ErrorKind.UNAVAILABLE, "the gateway is shutting down", code="shutting_down")
        if core.in_flight >= core.config.max_inflight:
            raise GatewayError(
                ErrorKind.OVERLOADED,
                f"the gateway is at its bound of {core.config.max_inflight} requests in flight; retry later",
                code="too_many_requests",
            )
        core.in_flight += 1
        core.metrics.in_flight.inc()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        core = self._core
        core.in_flight -= 1
        core.metrics.in_flight.dec()
        core.metrics.e2e.labels(self.api).observe(time.perf_counter() - self.received_at)


class GatewayCore:
    """The gateway's shared request path over one served model and one worker source."""

    def __init__(
        self,
        config: GatewayConfig,
        model: ServedModel,
        source: WorkerSource,
        keys: ApiKeys | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.source = source
        self.keys = keys or ApiKeys.disabled()
        self.metrics = metrics or GatewayMetrics()
        self.router = Router(
            source,
            prefill_fallbacks=config.prefill_fallbacks,
            colocate_below_tokens=config.colocate_below_tokens,
        )
        self.channels = WorkerChannels(config.security.load())
        self.dispatcher = Dispatcher(
            self.router, self.channels, model.tokenizer, self.metrics, config.route_attempts
        )
        self.preprocessor = Preprocessor(model, config)
        self.in_flight = 0
        self.draining = False
        self.metrics.watch_workers(
            lambda: len(source.current().decode), lambda: len(source.current().prefill)
        )

    def authenticate(self, authorization: str | None) -> str:
        """The caller's tenant; GatewayError(UNAUTHENTICATED) when keys are on and this one is
        wrong (counted by reason, never with the key)."""
        try:
            return self.keys.tenant(authorization)
        except KeyRefused as exc:
            self.metrics.auth_failures.labels(exc.reason.value).inc()
            raise

    def scope(self, api: str) -> RequestScope:
        """Admit a request (``with core.scope("chat"):``); OVERLOADED past the in-flight bound."""
        return RequestScope(self, api)

    def record(self, api: str, exc: BaseException | None) -> None:
        """Count a finished request by outcome (also for requests refused before admission)."""
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, GatewayError):
            outcome = exc.kind.name.lower()
            self.metrics.errors.labels(api, outcome).inc()
        elif isinstance(exc, asyncio.CancelledError | ConnectionError):
            outcome = "cancelled"
        else:
            outcome = "internal"
            self.metrics.errors.labels(api, outcome).inc()
        self.metrics.requests.labels(api, outcome).inc()

    async def generate(
        self, spec: GenerationSpec, tenant: str, received_at: float, timeout_s: float | None = None
    ) -> Generation:
        """Tokenize, check limits, route and open every choice; GatewayError on any failure."""
        request = await self.preprocessor.prepare(spec, tenant, received_at)
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        return await start_generation(self.dispatcher, request, timeout, self.metrics)

    def prune_channels(self) -> None:
        """Close channels to workers that left (called when the worker set changes)."""
        self.channels.prune({w.address for w in self.source.current().decode})

    async def close(self) -> None:
        await self.channels.close()
