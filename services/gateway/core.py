"""GatewayCore: what the HTTP and gRPC front ends share: keys, admission, preprocessing, routing,
and the gateway's metrics.

A front end authenticates, opens a RequestScope (the in-flight bound and the request's metrics),
parses its wire format into a GenerationSpec, and calls generate(); the rest is common.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from services.gateway.admission import ApiKeys, KeyRefused, Preprocessor, ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.request import ErrorKind, GatewayError, GenerationSpec
from services.gateway.routing import Route, Router, WorkerSource
from services.gateway.session import WorkerChannels
from services.gateway.streaming import Dispatcher, Generation, start_generation


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
            policy=config.routing_policy,
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


# ---- metrics (own registry, so tests can run several gateways in-process) ------------------------


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    """Request counts and latencies as the gateway sees them (what a client would measure)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(
            "scalellm_gateway_requests",
            "Requests answered, by API and outcome",
            ["api", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "scalellm_gateway_errors",
            "Requests that failed, by API and error kind",
            ["api", "kind"],
            registry=r,
        )
        self.in_flight = Gauge("scalellm_gateway_requests_in_flight", "Requests being served", registry=r)
        self.ttft = Histogram(
            "scalellm_gateway_time_to_first_token_seconds",
            "Arrival at the gateway to the first token received from a decode worker",
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "scalellm_gateway_time_per_output_token_seconds",
            "Per choice: (last token - first token) / (tokens - 1)",
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.e2e = Histogram(
            "scalellm_gateway_request_seconds",
            "Arrival to the end of the answer",
            ["api"],
            buckets=_LATENCY,
            registry=r,
        )
        self.overhead = Histogram(
            "scalellm_gateway_overhead_seconds",
            "Per choice: time spent in the gateway itself (validation, tokenization, routing, detokenization)",
            buckets=_OVERHEAD,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "scalellm_gateway_prompt_tokens", "Prompt tokens sent to workers", registry=r
        )
        self.completion_tokens = Counter(
            "scalellm_gateway_completion_tokens", "Tokens generated for clients", registry=r
        )
        self.retries = Counter(
            "scalellm_gateway_route_retries",
            "Decode workers skipped after a failure, by status",
            ["code"],
            registry=r,
        )
        self.cancelled = Counter(
            "scalellm_gateway_cancelled", "Decode streams cancelled early, by reason", ["reason"], registry=r
        )
        self.workers = Gauge("scalellm_gateway_workers", "Routable workers, by kind", ["kind"], registry=r)
        by_route = ["worker", "prefill"]
        """worker: where the prompt is computed; prefill: local (the decode worker) or remote."""
        self.routes = Counter(
            "scalellm_gateway_routes",
            "Sequences started, by the worker computing the prompt and prefill local or remote",
            by_route,
            registry=r,
        )
        self.route_prompt_blocks = Counter(
            "scalellm_gateway_route_prompt_blocks",
            "Prompt blocks a prefix-cache hit could cover, by worker and prefill local or remote",
            by_route,
            registry=r,
        )
        self.route_cached_blocks = Counter(
            "scalellm_gateway_route_cached_blocks",
            "Of those, blocks routing found cached on the worker computing the prompt (prefix hits)",
            by_route,
            registry=r,
        )
        self.route_prompt_tokens = Counter(
            "scalellm_gateway_route_prompt_tokens",
            "Prompt tokens routed, by worker and prefill",
            by_route,
            registry=r,
        )
        self.route_cached_tokens = Counter(
            "scalellm_gateway_route_cached_tokens",
            "Of those, tokens routing found cached on the worker computing the prompt",
            by_route,
            registry=r,
        )
        self.cached_prompt_tokens = Counter(
            "scalellm_gateway_cached_prompt_tokens",
            "Prompt tokens the decode worker reported as prefix-cache hits (usage), by decode worker",
            ["worker"],
            registry=r,
        )
        self.auth_failures = Counter(
            "scalellm_gateway_auth_failures",
            "Requests refused for their API key: missing, malformed or unknown (never the key itself)",
            ["reason"],
            registry=r,
        )

    def observe_route(self, route: Route, prompt_len: int) -> None:
        """Count one started sequence's routing decision and its prefix hit."""
        local = route.local_prefill
        worker = route.decode if local else route.prefill[0]
        labels = (worker.worker_id, "local" if local else "remote")
        self.routes.labels(*labels).inc()
        self.route_prompt_blocks.labels(*labels).inc(route.prompt_blocks)
        self.route_cached_blocks.labels(*labels).inc(route.cached_blocks)
        self.route_prompt_tokens.labels(*labels).inc(prompt_len)
        self.route_cached_tokens.labels(*labels).inc(min(prompt_len, route.cached_blocks * worker.block_size))

    def watch_workers(self, decode: Callable[[], float], prefill: Callable[[], float]) -> None:
        """Report the routable worker counts at scrape time."""
        self.workers.labels("decode").set_function(decode)
        self.workers.labels("prefill").set_function(prefill)

    def render(self) -> bytes:
        """The exposition text for GET /metrics."""
        return generate_latest(self.registry)
